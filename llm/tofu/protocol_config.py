"""The settings of one TOFU protocol run (:class:`ProtocolConfig`) and each objective's TOFU settings.

:mod:`llm.tofu.protocol` runs the stages these settings describe; ``config.json`` of a run folder is
:meth:`ProtocolConfig.state`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llm.config import TrainConfig
from markovsim.objectives import OBJECTIVES, Objective, get_objective

from .data import FORGET_AUTHORS, ITEMS_PER_AUTHOR, NUM_AUTHORS
from .evaluate import FORGET_SPLITS
from .methods import check_method_name, is_registry_method, parse_method_options
from .relearn import check_step_counts, split_forget

__all__ = ["RETAIN_SPLITS", "DEFAULT_METHODS", "NPO_BETA", "SIMNPO_SETTINGS", "RUNTIME_FIELDS", "PRESETS",
           "ProtocolConfig", "official_settings", "method_objective"]

RETAIN_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# The paper's TOFU rows (SimNPO Table 3): its NPO and SimNPO carry a retain term (the official code's
# npo_grad_diff / simnpo_grad_diff), beside GradDiff. Plain NPO / SimNPO stay available through --methods.
DEFAULT_METHODS = ("GradDiff", "NPO+RT", "SimNPO+RT")
# The official TOFU settings of the objectives (the NPO and SimNPO papers' TOFU code: forget.yaml and
# the SimNPO README; its npo_coeff is our forget_weight, grad_diff_coeff / KL_coeff our retain_weight):
#   GA, GradDiff        forget weight 1 (GradDiff: retain weight 1)
#   NPO, NPO+RT, NPO+KL beta 0.1, forget weight 1 (+RT / +KL: retain weight 1)
#   SimNPO              gamma 0, beta per split, forget weight 1
#   SimNPO+RT, +KL      gamma 0, beta and forget weight per split, retain weight 1
NPO_BETA = 0.1
# SimNPO per split: (beta, forget weight beside a retain term). forget01 has no official setting: forget05's.
SIMNPO_SETTINGS = {"forget01": (2.5, 0.1375), "forget05": (2.5, 0.1375), "forget10": (4.5, 0.125)}
# Settings that do not change the numbers: a rerun may change them.
RUNTIME_FIELDS = ("methods", "progress", "device", "num_threads", "checkpoint_every")
# Named sets of settings (``python -m llm.tofu run --preset NAME``; explicit flags override them):
#   paper  the ProtocolConfig defaults: the full split, TOFU's recipe (for a GPU)
#   cpu    the CPU protocol (``make tofu-figures``): forget01 (2 authors, 40 pairs) and the first 20 pairs of
#          the retain / real_authors / world_facts sets, batch 8, 48-token answers, unlearning long enough
#          that every default method closes at least half of the forget-probability gap between target and
#          retain model, relearning after 0 and 10 steps; 27-37 min on a 343 GFLOP/s 2-core VM
#          (docs/tofu.md, "The CPU protocol": the time per stage and the machine)
PRESETS = {"paper": {},
           "cpu": {"split": "forget01", "limit": 20, "batch_size": 8, "finetune_epochs": 5.0, "unlearn_epochs": 5.0,
                   "unlearn_lr": 5e-5, "max_new_tokens": 48, "device": "cpu", "relearn_steps": (0, 10)}}
_RETAIN90_AUTHORS = NUM_AUTHORS - FORGET_AUTHORS["forget10"]  # authors 0-179: in no forget split


def _objective_name(method: str) -> str:
    if check_method_name(method) not in OBJECTIVES:
        raise ValueError(f"{method!r} is a registry method (markovsim.methods), not an objective of "
                         f"{', '.join(OBJECTIVES)}: see llm.tofu.methods.method_config")
    return method


def official_settings(method: str, split: str) -> dict[str, float]:
    """The :class:`~markovsim.objectives.Objective` fields the official TOFU code sets for an objective on a split.

    ``{"forget_weight": ..., "retain_weight": ... (objectives with a retain term), "beta": ... (NPO, SimNPO),
    "gamma": 0.0 (SimNPO)}``; the 2x2 cells as :func:`markovsim.objectives.ingredient_ladder` builds them
    (NPO-ave with SimNPO's beta and weights, gamma dropped; SimNPO-sum with NPO's, gamma 0); e.g.
    ``official_settings("SimNPO+RT", "forget10")`` ->
    ``{"forget_weight": 0.125, "retain_weight": 1.0, "beta": 4.5, "gamma": 0.0}``.
    """
    if split not in SIMNPO_SETTINGS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SIMNPO_SETTINGS)}")
    has_retain = OBJECTIVES[_objective_name(method)].retain is not None
    fields = {"forget_weight": 1.0} | ({"retain_weight": 1.0} if has_retain else {})
    base, plus, suffix = method.partition("+")
    if base in ("NPO-ave", "SimNPO-sum"):  # the 2x2 cells: NPO-ave takes SimNPO's settings, SimNPO-sum NPO's
        like = official_settings(("SimNPO" if base == "NPO-ave" else "NPO") + plus + suffix, split)
        return like | ({"gamma": 0.0} if base == "SimNPO-sum" else {})
    if method.startswith("SimNPO"):
        beta, forget_weight = SIMNPO_SETTINGS[split]
        fields |= {"forget_weight": forget_weight if has_retain else 1.0, "beta": beta, "gamma": 0.0}
    elif method.startswith("NPO"):
        fields["beta"] = NPO_BETA
    return fields


def method_objective(method: str, split: str) -> Objective:
    """The objective ``method`` with the official TOFU settings of ``split`` (:func:`official_settings`)."""
    return get_objective(method, **official_settings(method, split))


def _positive(name: str, value, kind=int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0:
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an int'} > 0, got {value!r}")


@dataclass(frozen=True)
class ProtocolConfig:
    """Every setting of one protocol run (recorded in config.json and results.json).

    Fine-tuning defaults follow TOFU's (5 epochs, weight decay 0.01, linear decay after one warm-up
    epoch) at a learning rate of 1e-4, under which SmolLM2-135M memorises the pairs (TOFU's 1e-5 is for
    7B models); unlearning follows the official SimNPO / TOFU recipe (10 epochs, lr 1e-5, batch 32 on a
    GPU, AdamW with weight decay 0.01, linear decay after one warm-up epoch; ``unlearn_steps`` replaces
    the epochs and drops the warm-up; the CPU smoke run uses fewer steps and a smaller batch). The
    default methods are the paper's TOFU rows, :data:`DEFAULT_METHODS` (GradDiff, NPO+RT, SimNPO+RT),
    each objective with the official settings of the split (:func:`official_settings`).

    Membership inference holds out authors ``holdout_first_author`` .. + (2 / 10 / 20) - 1 (see the
    module docstring). The relearning attack (:mod:`llm.tofu.relearn`) fine-tunes each unlearned model
    on the first ``relearn_items_per_author`` pairs of every forget author (batch ``relearn_batch_size``,
    AdamW at a constant ``relearn_lr``) for each step count of ``relearn_steps`` (empty: no relearning)
    and measures the other pairs; the same runs from the target and the retain model are its controls.

    ``methods`` mixes ``markovsim`` objectives and registry methods (:data:`llm.tofu.methods.METHOD_NAMES`);
    ``method_options`` (``"Name.field=value"`` strings) change the registry methods' hyperparameters
    (:func:`llm.tofu.methods.parse_method_options`). Their auxiliary fine-tunes use the fine-tuning
    settings above; their unlearning the unlearning settings.
    """

    split: str = "forget10"
    methods: tuple[str, ...] = DEFAULT_METHODS
    model: str = "smollm2"
    limit: int | None = None
    batch_size: int = 32
    finetune_epochs: float = 5.0
    finetune_steps: int | None = None
    finetune_lr: float = 1e-4
    unlearn_epochs: float = 10.0
    unlearn_steps: int | None = None
    unlearn_lr: float = 1e-5
    max_new_tokens: int = 200
    eval_batch_size: int = 16
    lora: bool = False
    lora_rank: int = 8
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    checkpoint_every: int | None = None
    progress: bool = True
    holdout_first_author: int = 90
    relearn_steps: tuple[int, ...] = (0, 10, 25, 50)
    relearn_items_per_author: int = 4
    relearn_batch_size: int = 4
    relearn_lr: float = 1e-5
    method_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.split not in FORGET_SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(FORGET_SPLITS)}")
        if not self.methods or isinstance(self.methods, str):
            raise ValueError("methods must be a non-empty list of method names")
        for method in self.methods:
            if not is_registry_method(method):
                method_objective(method, self.split)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat a name: {list(self.methods)}")
        object.__setattr__(self, "method_options", tuple(self.method_options)
                           if not isinstance(self.method_options, str) else self.method_options)
        unused = sorted(set(self.options) - set(self.methods))  # parsing checks the options
        if unused:
            raise ValueError(f"method_options name {unused}, which are not among methods {list(self.methods)}; "
                             f"add them to --methods or drop their options")
        for name in ("batch_size", "max_new_tokens", "eval_batch_size", "lora_rank", "relearn_batch_size"):
            _positive(name, getattr(self, name))
        for name in ("limit", "finetune_steps", "unlearn_steps", "num_threads", "checkpoint_every"):
            _positive(name, getattr(self, name), optional=True)
        for name in ("finetune_epochs", "finetune_lr", "unlearn_epochs", "unlearn_lr", "relearn_lr"):
            _positive(name, getattr(self, name), kind=float)
        object.__setattr__(self, "relearn_steps", check_step_counts(self.relearn_steps))
        split_forget(ITEMS_PER_AUTHOR, self.relearn_items_per_author)  # checks the count
        first, last = self.holdout_first_author, _RETAIN90_AUTHORS - self.num_forget_authors
        if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= last:
            raise ValueError(f"holdout_first_author must be an int in [0, {last}] (the {self.num_forget_authors} "
                             f"holdout authors lie in retain90's authors 0-{_RETAIN90_AUTHORS - 1}), got {first!r}")

    @property
    def options(self) -> dict[str, dict]:
        """``method_options`` parsed: ``{method: {field: value}}`` (:func:`llm.tofu.methods.parse_method_options`)."""
        return parse_method_options(self.method_options)

    @property
    def num_forget_authors(self) -> int:
        return FORGET_AUTHORS[self.split]

    @property
    def holdout_authors(self) -> list[int]:
        """The held-out authors: as many as the forget split has, from ``holdout_first_author`` on."""
        return list(range(self.holdout_first_author, self.holdout_first_author + self.num_forget_authors))

    @property
    def retain_split(self) -> str:
        return RETAIN_SPLITS[self.split]

    def train_config(self, stage: str, num_items: int) -> TrainConfig:
        """The ``TrainConfig`` of a fine-tuning (``"finetune"``) or unlearning (``"unlearn"``) stage."""
        common = dict(batch_size=min(self.batch_size, num_items), seed=self.seed, device=self.device,
                      num_threads=self.num_threads, checkpoint_every=self.checkpoint_every, progress=self.progress,
                      eval_batch_size=self.eval_batch_size, track_forget_weights=False, track_power_share=False)
        if stage == "finetune":
            per_epoch = max(1, num_items // common["batch_size"])
            return TrainConfig(learning_rate=self.finetune_lr, epochs=self.finetune_epochs, steps=self.finetune_steps,
                               weight_decay=0.01, schedule="linear", warmup_steps=per_epoch if self.finetune_steps
                               is None else 0, divergence_logp_per_token=None, **common)
        per_epoch = max(1, num_items // common["batch_size"])  # one warm-up epoch, as the official TOFU code
        return TrainConfig(learning_rate=self.unlearn_lr, epochs=self.unlearn_epochs, steps=self.unlearn_steps,
                           weight_decay=0.01, schedule="linear", warmup_steps=per_epoch if self.unlearn_steps
                           is None else 0, **common)

    def state(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
