"""The field's other unlearning methods, one file each, behind one registry (docs/theory.md, "Other unlearning
methods").

``METHODS`` maps the registry names ``GA+Mismatch``, ``WHP``, ``TaskNegation``, ``KGA``, ``SeUL``, ``AdvGA`` and
``AdvNPO`` to a :class:`~markovsim.methods.base.MethodSpec`: its kind (objective, update rule, wrapper), its
hyperparameters (a frozen, validated dataclass), the paper's equation and its exact simulator counterpart.

Shared with ``llm`` (pure torch, per-token / per-sequence tensors): ``losses.masked_ga`` (SeUL),
``mismatch.mismatch_pairs`` / ``ga_mismatch_loss``, ``whp.generic_logits`` / ``generic_target_log_probs``,
``task_negation.task_vector`` / ``negate_task`` (tuples or state dicts), ``kga.gap_alignment`` / ``kga_loss``,
``seul.select_sensitive_tokens`` and the S-MA / S-EL metrics, ``lau.adversarial_perturbation`` /
``project_to_ball`` / ``autograd_ascent_direction``. Simulator: ``simulate.run_method(name, setup)``.
"""

from .base import KINDS, ExactStep, FineTuneConfig, MethodSpec
from .exact import fine_tune, unlearn_exact
from .kga import KGAConfig
from .lau import LAUConfig
from .mismatch import GAMismatchConfig
from .registry import METHODS, get_config, get_method
from .seul import SeULConfig
from .simulate import exact_problem, run_method, unseen_sequences
from .task_negation import TaskNegationConfig
from .whp import WHPConfig

__all__ = ["KINDS", "ExactStep", "FineTuneConfig", "MethodSpec", "fine_tune", "unlearn_exact", "KGAConfig",
           "LAUConfig", "GAMismatchConfig", "METHODS", "get_config", "get_method", "SeULConfig", "exact_problem",
           "run_method", "unseen_sequences", "TaskNegationConfig", "WHPConfig"]
