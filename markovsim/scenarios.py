"""Named, documented scenarios of the simulator and user-defined ones.

Theory: docs/theory.md, "The paper's synthetic experiment" and "Divergence speed".

A :class:`Scenario` is a mixture specification (paper scale), the methods to compare with their
hyperparameters, and default dynamics. :func:`prepare` samples the data and fits, for either model
class, the reference model on the pre-training components and the retrained model on the retain
components, and builds the test-set evaluator.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .chains import MarkovChain, block_chains
from .config import check_integer, check_real
from .data import Component, MixtureSpec, SequenceSet
from .dynamics import DynamicsConfig
from .evaluation import ExactEvaluator
from .losses import USES_BETA, USES_GAMMA
from .mixture import MixtureOfChains
from .objectives import OBJECTIVES, Objective, get_objective, ingredient_ladder
from .runtime import torch_threads
from .tabular import TabularMarkov

PAPER_COUNTS = {"retain": 10000, "forget1": 5000, "forget2": 5000}
MODEL_CLASSES = ("tabular", "mixture")


def paper_mixture_spec(forget2_length: int = 5, forget2_in_pretraining: bool = True, scale: float = 1.0,
                       num_states: int = 10, leakage: float = 0.2, length: int = 20, seed: int = 0) -> MixtureSpec:
    """The paper's mixture: retain and forget1 of ``length``, forget2 of ``forget2_length``.

    Each component has ``scale * PAPER_COUNTS[name]`` sequences (paper: 10000 / 5000 / 5000), split
    80/20 into train/test. ``forget2_in_pretraining=False`` gives case (b) of the paper.
    """
    check_real("scale", scale, minimum=0.0, exclusive=True)
    check_integer("forget2_length", forget2_length, 2)
    check_integer("length", length, 2)
    chains = block_chains(num_states, leakage)
    lengths = {"retain": length, "forget1": length, "forget2": forget2_length}
    components = tuple(
        Component.with_split(name, chains[name], lengths[name], max(5, int(round(scale * count))),
                             role="retain" if name == "retain" else "forget",
                             in_pretraining=forget2_in_pretraining or name != "forget2")
        for name, count in PAPER_COUNTS.items()
    )
    return MixtureSpec(components, seed=seed)


@dataclass(frozen=True)
class Scenario:
    """A question, the data that poses it, and the methods that answer it.

    Attributes:
        name, question: identification and the question the scenario answers.
        spec: the mixture at paper scale (use :meth:`scaled` for smaller runs).
        methods: ``{label: Objective}`` compared by default.
        dynamics: default optimiser settings.
    """

    name: str
    question: str
    spec: MixtureSpec
    methods: Mapping[str, Objective]
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)

    def scaled(self, scale: float) -> "Scenario":
        """The same scenario with every component's train/test counts multiplied by ``scale`` (at least 2 + 1)."""
        check_real("scale", scale, minimum=0.0, exclusive=True)
        components = tuple(dataclasses.replace(c, num_train=max(2, int(round(c.num_train * scale))),
                                               num_test=max(1, int(round(c.num_test * scale))))
                           for c in self.spec.components)
        return dataclasses.replace(self, spec=MixtureSpec(components, self.spec.seed))

    def with_methods(self, names, betas=None, gammas=None) -> dict[str, Objective]:
        """Objectives for method ``names`` (scenario defaults, else the registry), optionally overriding beta/gamma.

        The 2x2 cells ``NPO-ave`` and ``SimNPO-sum`` (and their ``+RT`` forms), when the scenario does not list
        them, come from its NPO and SimNPO settings (:func:`markovsim.objectives.ingredient_ladder`): NPO-ave with
        SimNPO's beta and weights, SimNPO-sum with NPO's, so each pair differs in one ingredient.

        ``betas``: one number for every method that has a beta, or ``{method: beta}`` (methods left
        out keep their beta; naming a method not run, or one without a beta, is a ValueError).
        """
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"method names must be a list of strings, got {names!r}")
        bases = {name: self.methods.get(name) or self._ladder_cell(name) or get_objective(name) for name in names}
        if isinstance(betas, Mapping):
            wrong = [m for m in betas if m not in bases or bases[m].forget not in USES_BETA]
            if wrong:
                raise ValueError(f"betas given for {wrong}, which are not among the methods run or have no beta; "
                                 f"methods with a beta: {[m for m, o in bases.items() if o.forget in USES_BETA]}")
        result = {}
        for name, base in bases.items():
            overrides = {}
            beta = betas.get(name) if isinstance(betas, Mapping) else betas
            if beta is not None and base.forget in USES_BETA:
                overrides["beta"] = beta
            if gammas is not None and base.forget in USES_GAMMA:
                overrides["gamma"] = gammas
            result[name] = dataclasses.replace(base, **overrides)
        return result


    def _ladder_cell(self, name) -> Objective | None:
        """NPO-ave / SimNPO-sum (optionally +RT) built from this scenario's NPO and SimNPO; None otherwise."""
        base, plus, suffix = str(name).partition("+")
        npo, simnpo = self.methods.get("NPO" + plus + suffix), self.methods.get("SimNPO" + plus + suffix)
        if base not in ("NPO-ave", "SimNPO-sum") or npo is None or simnpo is None:
            return None
        return ingredient_ladder(npo, simnpo)[base]


def data_memory_bytes(spec: MixtureSpec) -> int:
    """Rough bytes :func:`prepare` holds for ``spec``'s data (checked before sampling an absurd size).

    Per sequence: tokens (8 max_len), the first-state one-hot (8 V) and the transition counts
    (8 V^2), held about twice (the train/test sets plus the forget/retain subsets).
    """
    sequences = sum(c.num_train + c.num_test for c in spec.components)
    max_len, num_states = max(c.length for c in spec.components), spec.num_states
    return 2 * sequences * 8 * (max_len + num_states + num_states * num_states + 2)


def check_data_memory(spec: MixtureSpec, what: str) -> None:
    """ValueError when :func:`data_memory_bytes` exceeds half the machine's memory, naming ``what`` (what the user
    set: ``"--scale 1e7"``, or the scenario) and the largest component's ``num_train`` / ``num_test``."""
    needed, available = data_memory_bytes(spec), physical_memory()
    if available and needed > available // 2:
        largest = max(spec.components, key=lambda component: component.num_train + component.num_test)
        raise ValueError(f"{what}: the data would need about {format_bytes(needed)} of memory (more than half of "
                         f"this machine's {format_bytes(available)}); the largest component, {largest.name!r}, has "
                         f"num_train {largest.num_train} and num_test {largest.num_test}: use fewer sequences "
                         f"(or a smaller scale)")


def data_memory_subject(scenario: str, scale: float) -> str:
    """What :func:`check_data_memory` blames on a command line: the ``--scale`` flag when it changes the scenario's
    sizes, else the scenario (a name or a JSON file) itself."""
    return f"--scale {scale:g}" if scale != 1.0 else f"scenario {scenario!r}"


def physical_memory() -> int:
    """Bytes of RAM (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def format_bytes(num_bytes: float) -> str:
    """``1.5e12`` -> ``"1.4 TiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


@dataclass(frozen=True)
class Setup:
    """Sampled data and fitted models of a scenario for one model class."""

    scenario: Scenario
    model_class: str
    train: SequenceSet
    test: SequenceSet
    forget: SequenceSet
    retain: SequenceSet
    reference: object
    retrained: object
    true_chains: dict[str, MarkovChain]
    evaluator: ExactEvaluator


def _fit(model_class: str, sequences: SequenceSet, components: tuple[Component, ...]):
    if model_class == "tabular":
        return TabularMarkov.fit(sequences)
    init = MixtureOfChains.from_components(components)
    model, _ = MixtureOfChains.fit(sequences, len(components), np.random.default_rng(0), max_iterations=30,
                                   tolerance=1e-6, smoothing=1e-3, init=init)
    return model


def prepare(scenario: Scenario, model_class: str = "tabular") -> Setup:
    """Sample the scenario's data and fit reference (pre-training components) and retrained (retain) models.

    The mixture model is fitted by EM with one latent chain per component, started at the true chains.
    """
    if not isinstance(scenario, Scenario):
        raise TypeError(f"scenario must be a markovsim Scenario (e.g. SCENARIOS['paper_short_forget2']), "
                        f"got {type(scenario).__name__}")
    if model_class not in MODEL_CLASSES:
        raise ValueError(f"model_class must be one of {MODEL_CLASSES}, got {model_class!r}")
    check_data_memory(scenario.spec, f"scenario {scenario.name!r}")
    with torch_threads(1):
        return _prepare(scenario, model_class)


def _prepare(scenario: Scenario, model_class: str) -> Setup:
    spec = scenario.spec
    train, test = spec.sample()
    pretraining = tuple(c for c in spec.components if c.in_pretraining)
    retain_components = tuple(c for c in spec.components if c.role == "retain")
    forget_names = spec.names_where(role="forget")
    if not pretraining or not retain_components or not forget_names:
        raise ValueError(f"scenario {scenario.name!r} needs pre-training, retain and forget components")
    reference = _fit(model_class, train.select(*[c.name for c in pretraining]), pretraining)
    retain = train.select(*[c.name for c in retain_components])
    retrained = _fit(model_class, retain, retain_components)
    true_chains = {c.name: c.chain for c in spec.components}
    return Setup(scenario, model_class, train, test, train.select(*forget_names), retain, reference, retrained,
                 true_chains, ExactEvaluator(test, true_chains, retrained, reference))


_DEFAULT_DYNAMICS = DynamicsConfig(optimizer="adamw", learning_rate=0.02, steps=50)

SCENARIOS: dict[str, Scenario] = {
    "paper_short_forget2": Scenario(
        "paper_short_forget2",
        "Forget data of two lengths (forget1: 20, forget2: 5), all of it pre-trained: does NPO's "
        "reference-relative weight allocate unlearning power unevenly across lengths, and does "
        "SimNPO's length-normalised weight fix it? (SimNPO paper, Fig. 3 case a)",
        paper_mixture_spec(forget2_length=5),
        {"GA": OBJECTIVES["GA"], "NPO": get_objective("NPO", beta=0.2), "SimNPO": get_objective("SimNPO", beta=4.0)},
        _DEFAULT_DYNAMICS),
    "paper_unseen_forget2": Scenario(
        "paper_unseen_forget2",
        "forget2 never entered pre-training (the reference assigns it low likelihood): does NPO "
        "still spend full weight on already-unlearned data while forget1 lags? (SimNPO Fig. 3 case b)",
        paper_mixture_spec(forget2_length=20, forget2_in_pretraining=False),
        {"GA": OBJECTIVES["GA"], "NPO": get_objective("NPO", beta=1.0), "SimNPO": get_objective("SimNPO", beta=4.0)},
        _DEFAULT_DYNAMICS),
    "npo_divergence": Scenario(
        "npo_divergence",
        "How fast do GA and NPO drive the forget log-likelihood down under plain gradient descent: "
        "linearly in the step count (GA) or only logarithmically (NPO, NPO paper Theorem 2), and what "
        "retain damage does each pay at equal forget progress?",
        paper_mixture_spec(forget2_length=20),
        {"GA": OBJECTIVES["GA"], "NPO": get_objective("NPO", beta=1.0)},
        DynamicsConfig(optimizer="gd", learning_rate=1.0, steps=400, eval_every=4, divergence_logp_per_token=-1e6)),
}


# ---------------------------------------------------------------------------------------------
# User-defined scenarios from a dict / JSON
# ---------------------------------------------------------------------------------------------

_SCENARIO_KEYS = {"name", "question", "num_states", "leakage", "seed", "chains", "components", "methods", "dynamics"}
_COMPONENT_KEYS = {"name", "chain", "length", "num_train", "num_test", "role", "in_pretraining"}


def _build_chain(name: str, description, num_states: int, leakage: float) -> MarkovChain:
    if isinstance(description, str):
        blocks = block_chains(num_states, leakage)
        if description not in blocks:
            raise ValueError(f"'chains': chain {name!r}: block name must be one of {list(blocks)}, got {description!r}")
        return blocks[description]
    if not isinstance(description, Mapping) or set(description) != {"initial_probs", "transition_matrix"}:
        raise ValueError(f"'chains': chain {name!r} must be a block name ('retain', 'forget1', 'forget2') or "
                         f"{{'initial_probs': [...], 'transition_matrix': [[...]]}}")
    chain = _keyed(f"'chains': chain {name!r}", MarkovChain, description["initial_probs"],
                   description["transition_matrix"])
    if chain.num_states != num_states:
        raise ValueError(f"'chains': chain {name!r} has {chain.num_states} states but num_states is {num_states}")
    return chain


def _keyed(where: str, build, *args, **kwargs):
    """``build(*args, **kwargs)``; a ValueError / TypeError is re-raised (same type) prefixed with ``where``."""
    try:
        return build(*args, **kwargs)
    except (ValueError, TypeError) as error:
        raise type(error)(f"scenario spec: {where}: {error}") from error


def _check_keys(where: str, entry, required: set, allowed: set) -> None:
    if not isinstance(entry, Mapping):
        raise TypeError(f"scenario spec: {where} must be a dict, got {type(entry).__name__}")
    unknown, missing = sorted(map(str, set(entry) - allowed)), sorted(required - set(entry))
    if unknown or missing:
        raise ValueError(f"scenario spec: {where} must have keys {sorted(required)} (optional: "
                         f"{sorted(allowed - required)}); unknown keys {unknown}, missing keys {missing}")


def _string(where: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"scenario spec: {where} must be a string, got {type(value).__name__}")
    return value


def _component(entry, chains: dict) -> Component:
    _check_keys("a 'components' entry", entry, {"name", "chain", "length", "num_train", "num_test"}, _COMPONENT_KEYS)
    name = _string("a 'components' entry's 'name'", entry["name"])
    chain = _string(f"component {name!r}: 'chain'", entry["chain"])
    if chain not in chains:
        raise ValueError(f"scenario spec: component {name!r} uses unknown chain {chain!r}; chains are {list(chains)}")
    return _keyed(f"component {name!r}", Component, name, chains[chain], entry["length"], entry["num_train"],
                  entry["num_test"], entry.get("role", "retain"), entry.get("in_pretraining", True))


def _objectives(methods) -> dict[str, Objective]:
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"scenario spec: 'methods' must be a non-empty dict like {{'NPO': {{'beta': 0.2}}}}; "
                         f"method names are {list(OBJECTIVES)}")
    objectives = {}
    for name, overrides in methods.items():
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"scenario spec: 'methods': {name!r} must map to a dict of settings like {{'beta': 0.2}} "
                            f"(or null for the defaults), got {type(overrides).__name__}")
        keyword_overrides = {str(k): v for k, v in (overrides or {}).items()}
        objectives[name] = _keyed(f"'methods': {name!r}", get_objective, name, **keyword_overrides)
    return objectives


def _dynamics(settings) -> DynamicsConfig:
    valid = {f.name for f in dataclasses.fields(DynamicsConfig)}
    _check_keys("'dynamics'", settings, set(), valid)
    return _keyed("'dynamics'", DynamicsConfig, **settings)


def scenario_from_dict(document: Mapping) -> Scenario:
    """Build a :class:`Scenario` from a JSON-ready dict, validating every field.

    Every error is a ValueError (bad value) or TypeError (wrong type) naming the key. Example::

        {"name": "two_lengths", "question": "...", "num_states": 10, "leakage": 0.2, "seed": 0,
         "chains": {"r": "retain", "f": "forget1"},
         "components": [{"name": "retain", "chain": "r", "length": 20, "num_train": 800, "num_test": 200},
                        {"name": "forget", "chain": "f", "length": 5, "num_train": 400, "num_test": 100,
                         "role": "forget", "in_pretraining": true}],
         "methods": {"NPO": {"beta": 0.2}, "SimNPO": {"beta": 4.0}},
         "dynamics": {"optimizer": "adamw", "learning_rate": 0.02, "steps": 50}}
    """
    if not isinstance(document, Mapping):
        raise TypeError(f"a scenario spec must be a dict, got {type(document).__name__}")
    _check_keys("the document", document, {"name", "chains", "components", "methods"}, _SCENARIO_KEYS)
    name, question = _string("'name'", document["name"]), _string("'question'", document.get("question", ""))
    num_states = _keyed("'num_states'", check_integer, "num_states", document.get("num_states", 10), 3)
    leakage = _keyed("'leakage'", check_real, "leakage", document.get("leakage", 0.2), minimum=0.0)
    if leakage > 1:
        raise ValueError(f"scenario spec: 'leakage' must lie in [0, 1], got {leakage}")
    seed = _keyed("'seed'", check_integer, "seed", document.get("seed", 0), 0)
    if not isinstance(document["chains"], Mapping) or not document["chains"]:
        raise ValueError("scenario spec: 'chains' must be a non-empty dict of name -> chain")
    chains = {str(k): _build_chain(str(k), d, num_states, leakage) for k, d in document["chains"].items()}
    if not isinstance(document["components"], (list, tuple)):
        raise TypeError(f"scenario spec: 'components' must be a list, got {type(document['components']).__name__}")
    if not document["components"]:
        raise ValueError("scenario spec: 'components' must list at least one retain and one forget component")
    components = tuple(_component(entry, chains) for entry in document["components"])
    spec = _keyed("'components'", MixtureSpec, components, seed)
    scenario = Scenario(name, question, spec, _objectives(document["methods"]),
                        _dynamics(document.get("dynamics", {})))
    if not scenario.spec.names_where(role="forget") or not scenario.spec.names_where(role="retain"):
        raise ValueError("scenario spec needs at least one component with role 'forget' and one with role 'retain'")
    return scenario


def load_scenario(name_or_path: str) -> Scenario:
    """A named scenario from ``SCENARIOS`` or a user scenario from a JSON file (errors name the file)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"scenario must be a name or a path, got {type(name_or_path).__name__}")
    if name_or_path in SCENARIOS:
        return SCENARIOS[name_or_path]
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path, encoding="utf-8") as file:
                document = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{name_or_path} is not valid JSON: {error}") from error
        try:
            return scenario_from_dict(document)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name_or_path}: {error}") from error
    raise ValueError(f"unknown scenario {name_or_path!r}: use one of {list(SCENARIOS)} or a path to a JSON spec")
