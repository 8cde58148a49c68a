"""llm: the unlearning losses of ``markovsim.losses`` on Hugging Face ``transformers`` causal LMs.

Transformers are pre-trained, retrained and unlearned on the same Markov-mixture data as the
simulator, on CPU or CUDA (bf16 autocast), single- or multi-process (``accelerate``), and return
the simulator's ``Trajectory`` so that every plot accepts either side. See docs/theory.md for the maths.

    models     PRESETS, build_model, load_model           (configs only, never downloaded)
    data       SequenceSet -> HF batches (BOS, labels -100), seeded batch order
    logps      model_sequence_logps(model, batch) -> (logps, num_tokens), via the shared reducer
    objective  an Objective on a transformer batch (cached reference log-probs)
    train      pretrain, retrain, unlearn, TrainConfig
    evaluate   Evaluator: per-component KL to the true chains / retrained / exact models
    methods    the registry methods of markovsim.methods (GA+Mismatch, WHP, TaskNegation, KGA, SeUL,
               AdvGA, AdvNPO): prepare_method, method_loss, apply_task_negation, unlearn_method
    python -m llm pretrain|retrain|unlearn|evaluate
"""

from .evaluate import Evaluator, next_token_probs
from .logps import model_sequence_logps
from .methods import MethodBatch, apply_task_negation, method_loss, prepare_method, unlearn_method
from .models import PRESETS, build_model, load_model
from .train import PAPER_PRETRAINING, PAPER_UNLEARNING, TrainConfig, TrainingHistory, pretrain, retrain, unlearn

__all__ = ["Evaluator", "next_token_probs", "model_sequence_logps", "MethodBatch", "apply_task_negation",
           "method_loss", "prepare_method", "unlearn_method", "PRESETS", "build_model", "load_model",
           "PAPER_PRETRAINING", "PAPER_UNLEARNING", "TrainConfig", "TrainingHistory", "pretrain", "retrain", "unlearn"]
