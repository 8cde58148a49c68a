"""Pre-training, retraining and unlearning of transformers on Markov data: the public entry points.

A facade over the modules that do the work, so ``from llm.train import ...`` keeps working:

    llm.config       TrainConfig (validated, one flag per field), PAPER_PRETRAINING, PAPER_UNLEARNING
    llm.session      Session: accelerator, optimizer, schedule, checkpoints/resume, the step tail
    llm.pretraining  pretrain, retrain, TrainingHistory
    llm.unlearning   unlearn (returns a markovsim Trajectory)
    llm.diagnostics  mean gradient weight and power share per component
"""

from __future__ import annotations

from .config import PAPER_PRETRAINING, PAPER_UNLEARNING, SCHEDULES, TrainConfig
from .pretraining import TrainingHistory, pretrain, retrain
from .session import learning_rate_factor
from .unlearning import unlearn

__all__ = ["SCHEDULES", "TrainConfig", "PAPER_PRETRAINING", "PAPER_UNLEARNING", "TrainingHistory",
           "learning_rate_factor", "pretrain", "retrain", "unlearn"]
