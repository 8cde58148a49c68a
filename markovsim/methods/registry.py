"""The registry of the field's other unlearning methods: ``METHODS[name]`` is a :class:`MethodSpec`.

Separate from :data:`markovsim.objectives.OBJECTIVES` (GA, NPO, SimNPO and their retain variants), whose
entries are all ``Objective`` values and whose callers rely on that shape. docs/theory.md, "Other
unlearning methods", has each method's equations; each module's docstring says what is uncertain.
"""

from __future__ import annotations

from ..objectives import Objective
from . import kga, lau, mismatch, seul, task_negation, whp
from .base import MethodSpec

__all__ = ["METHODS", "get_method", "get_config"]

_NO_EXACT_SPANS = "online spans become a token mask; text-level span annotation (offline NER / GPT) has no analogue"

METHODS: dict[str, MethodSpec] = {
    "GA+Mismatch": MethodSpec(
        "GA+Mismatch", "objective", mismatch.GAMismatchConfig(),
        "Yao, Xu, Liu 2023, Large Language Model Unlearning",
        "L = eps1 mean_f logp/|y| + eps2 mean_mismatch -logp/|y| + eps3 KL(pi_ref || pi_theta) on normal data",
        mismatch.build_exact,
        "exact: a mismatch sequence is the forget prompt (first state) followed by a random retain response"),
    "WHP": MethodSpec(
        "WHP", "objective", whp.WHPConfig(),
        "Eldan & Russinovich 2023, Who's Harry Potter? Approximate Unlearning in LLMs",
        "v_g = v_b - alpha ReLU(v_r - v_b); minimise token-mean KL(softmax(v_g) || pi_theta) on forget data",
        whp.build_exact,
        "exact with v = next-token log-probabilities; the anchored-term replacement (text) has no analogue"),
    "TaskNegation": MethodSpec(
        "TaskNegation", "update_rule", task_negation.TaskNegationConfig(),
        "Ilharco et al. 2023 (task arithmetic); Ni et al. 2023, Forgetting before Learning (F-Learning)",
        "theta <- theta - lambda (theta_ft - theta), theta_ft fine-tuned on the forget data",
        task_negation.build_exact,
        "exact in the models' logit parameters; LoRA deltas are a transformer-side choice of tau"),
    "KGA": MethodSpec(
        "KGA", "objective", kga.KGAConfig(),
        "Wang et al., ACL 2023, KGA: A General Machine Unlearning Framework Based on Knowledge Gap Alignment",
        "L = |dis_Df(A*, A_f) - dis_Dn(A_D, A_n)| + alpha KL(A_D || A*) on D_r, dis = token-mean KL",
        kga.build_exact,
        "exact: A_f, A_n trained on D_f alone and on fresh retain-chain data D_n (tabular MLE, or fine-tuned)"),
    "SeUL": MethodSpec(
        "SeUL", "objective", seul.SeULConfig(),
        "Wang et al. 2024, Selective Forgetting: Advancing Machine Unlearning Techniques and Evaluation in LMs",
        "L(y) = (1/|S_y|) sum_{t in S_y} log p_t, S_y the sensitive tokens (online: the most probable ones)",
        seul.build_exact,
        "exact for a fixed mask; " + _NO_EXACT_SPANS),
    "AdvGA": MethodSpec(
        "AdvGA", "wrapper", lau.LAUConfig(Objective("ga")),
        "Yuan et al. 2024, Towards Robust Knowledge Unlearning (LAU)",
        "min_theta L_GA(theta, delta*), delta* = argmax_{||delta|| <= eps} forget log-likelihood (K PGD steps)",
        lau.build_exact,
        "exact outer gradient (Danskin); delta lives in logit space, not in a hidden layer"),
    "AdvNPO": MethodSpec(
        "AdvNPO", "wrapper", lau.LAUConfig(Objective("npo", beta=0.1)),
        "Yuan et al. 2024, Towards Robust Knowledge Unlearning (LAU)",
        "min_theta L_NPO(theta, delta*), delta* = argmax_{||delta|| <= eps} forget log-likelihood (K PGD steps)",
        lau.build_exact,
        "exact outer gradient (Danskin); delta lives in logit space, not in a hidden layer"),
}


def get_method(name: str) -> MethodSpec:
    """The registry entry ``name`` (ValueError listing the names otherwise)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid names: {list(METHODS)}")
    return METHODS[name]


def get_config(name: str, **overrides):
    """The default hyperparameters of method ``name`` with fields replaced, e.g. get_config("WHP", alpha=2.0)."""
    return get_method(name).with_config(**overrides)
