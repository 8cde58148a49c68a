"""Property-based fuzz suite: malformed inputs of every kind give a clear error or a valid result.

Over the public API (every configuration dataclass field, the loss functions, chains, sequence
sets, scenario dicts, files) and both command lines (in-process ``main(argv)``), the only allowed
outcomes are success with a valid result, or a ``ValueError`` / ``TypeError`` (or a subclass) whose
message names the argument (field, key, flag or file); a command line answers bad input with exit
status 2 and one ``error:`` line, no traceback. Derandomised with a fixed number of examples per
test (``EXAMPLES``), so the suite's cost is bounded (about a minute on one core).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import re
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import (
    bad_betas,
    bad_flow_times,
    bad_row_indices,
    bad_weights,
    betas,
    flow_times,
    gammas,
    moderate_sequence_batches,
    objective_terms,
    one_bad_argument,
    random_chain,
    row_indices,
    saved_component_names,
    saved_num_states,
    scenario_sizes,
)

from markovsim import losses
from markovsim.chains import MarkovChain
from markovsim.config import RunSettings
from markovsim.data import Component, MixtureSpec, SequenceSet
from markovsim.dynamics import DynamicsConfig, gradient_flow, unlearn
from markovsim.evaluation import ExactEvaluator
from markovsim.objectives import OBJECTIVES, Objective
from markovsim.scenarios import load_scenario, paper_mixture_spec, scenario_from_dict
from markovsim.tabular import TabularMarkov

EXAMPLES = {  # test -> max_examples (the suite's size: see benchmarks/RESULTS.md, "Fuzz suite")
    "config_fields": 2000, "model_preset": 600, "losses": 1500, "chains": 600, "sequence_sets": 800,
    "mixture_spec": 400, "scenario_dicts": 1000, "files": 300, "model_folders": 40,
    "markovsim_cli": 600, "llm_cli": 300, "unlearn": 60, "gradient_flow": 40, "sequence_subset": 200,
    "empty_sequence_set": 50, "sequence_files": 60, "mixture_components": 100, "objective": 300,
    "objective_total": 200, "scenario_memory": 30}


def fuzz(name: str):
    return settings(derandomize=True, max_examples=EXAMPLES[name], deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def bad_values():
    """Values of the wrong type or out of range: None, bools, huge/negative/zero ints, NaN/inf, strings, containers."""
    return st.one_of(
        st.none(), st.booleans(), st.integers(-10**12, 10**12), st.sampled_from([0, -1, 1, 2, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5]),
        st.text(max_size=6), st.sampled_from(["", "0.1", "none", "adamw", "gd", "cpu"]),
        st.lists(st.floats(-2, 2), max_size=3), st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True)),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def expect_clear(call, *names):
    """``call()`` succeeds, or raises ValueError/TypeError naming one of ``names`` as a word; returns (result, error).

    ``names``: the argument that was set to a bad value, and only the arguments a check legitimately relates it
    to (not every parameter of the call: an error naming another argument is a wrong message).
    """
    try:
        return call(), None
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(re.search(rf"(?<![\w-]){re.escape(str(name))}(?![\w-])", message) for name in names), \
            f"{type(error).__name__}: {message!r} names none of {names}"
        return None, error


def _finite_fields(instance) -> None:
    """A constructed config holds no NaN/inf, and no bool where a number belongs."""
    hints = {f.name: f.type for f in dataclasses.fields(instance)}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float):
                assert math.isfinite(item), (field.name, item)
            if isinstance(item, bool):
                assert "bool" in str(hints[field.name]), (field.name, item)


def _config_classes():
    from llm.config import TrainConfig

    return [RunSettings, DynamicsConfig, TrainConfig]


@fuzz("config_fields")
@given(data=st.data())
def test_every_config_field_rejects_bad_values_naming_the_field(data):
    cls = data.draw(st.sampled_from(_config_classes()))
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls) if f.init]))
    value = data.draw(bad_values())
    config, _ = expect_clear(lambda: cls(**{field: value}), field)
    if config is not None:
        _finite_fields(config)


@fuzz("model_preset")
@given(data=st.data())
def test_model_preset_fields(data):
    from llm.models import ModelPreset

    fields = [f.name for f in dataclasses.fields(ModelPreset)]
    field = data.draw(st.sampled_from(fields))
    arguments = ({"architecture": "gpt2", "num_layers": 2, "num_heads": 2, "hidden_size": 32}
                 | {field: data.draw(bad_values())})
    preset, _ = expect_clear(lambda: ModelPreset(**arguments), field)
    if preset is not None:
        _finite_fields(preset)
        assert preset.num_layers >= 1 and preset.hidden_size % preset.num_heads == 0


def tensors(max_batch: int = 4):
    """(B,) or odd-shaped tensors of assorted dtypes, with NaN/inf sometimes."""
    values = st.one_of(st.floats(-50, 50), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0, -1.0]))
    shapes = st.one_of(st.tuples(st.integers(0, max_batch)), st.tuples(st.integers(0, 3), st.integers(0, 3)),
                       st.just(()))
    dtypes = st.sampled_from([torch.float64, torch.float32, torch.int64, torch.bool])

    def build(shape, dtype, fill):
        array = np.resize(np.asarray(fill or [0.0]), shape) if shape else np.asarray(fill[0] if fill else 0.0)
        if dtype == torch.bool:
            return torch.as_tensor(array != 0)
        if not dtype.is_floating_point:
            return torch.as_tensor(np.nan_to_num(array, nan=0, posinf=5, neginf=-5).astype(np.int64))
        return torch.as_tensor(array, dtype=dtype)

    plain = st.builds(build, shapes, dtypes, st.lists(values, max_size=8))
    return st.one_of(plain, st.sampled_from([None, 1.0, [1.0, 2.0], "x"]))


LOSS_FUNCTIONS = ["ga", "ga_sum", "npo", "simnpo", "nll", "dpo", "wga", "kl", "reduce_token_logps"]


@fuzz("losses")
@given(data=st.data())
def test_loss_functions_on_malformed_tensors(data):
    name = data.draw(st.sampled_from(LOSS_FUNCTIONS))
    function = getattr(losses, name)
    parameters = inspect.signature(function).parameters
    arguments = {}
    for parameter in parameters.values():
        if parameter.name in ("beta", "gamma", "alpha"):
            arguments[parameter.name] = data.draw(st.one_of(st.floats(-2, 5), bad_values()))
        else:
            arguments[parameter.name] = data.draw(tensors())
    result, _ = expect_clear(lambda: function(**arguments), *parameters)
    if result is not None:  # a loss needs B >= 1; the reducer maps an empty batch to empty outputs (documented)
        for item in result if isinstance(result, tuple) else (result,):
            assert torch.isfinite(item).all() and (item.numel() > 0 or name == "reduce_token_logps"), (name, item)


def matrices():
    entries = st.one_of(st.floats(-1, 2), st.sampled_from([math.nan, math.inf, 0.0, 0.5, 1.0]))
    shapes = st.one_of(st.tuples(st.integers(0, 4)), st.tuples(st.integers(0, 4), st.integers(0, 4)))
    stochastic = st.integers(1, 4).map(lambda v: np.full((v, v), 1.0 / v))
    return st.one_of(stochastic, stochastic.map(lambda m: m[0]),
                     st.builds(lambda shape, fill: np.resize(np.asarray(fill or [0.0]), shape), shapes,
                               st.lists(entries, max_size=16)),
                     bad_values())


@fuzz("chains")
@given(initial=matrices(), transition=matrices())
def test_markov_chains_reject_non_stochastic_input(initial, transition):
    chain, _ = expect_clear(lambda: MarkovChain(initial, transition), "initial_probs", "transition_matrix")
    if chain is not None:
        assert np.allclose(chain.transition_matrix.sum(1), 1) and (chain.transition_matrix >= 0).all()
        assert np.isclose(chain.initial_probs.sum(), 1) and (chain.initial_probs >= 0).all()


def arrays(max_rows: int = 4):
    fill = st.lists(st.one_of(st.integers(-3, 12), st.sampled_from([math.nan, 1.5, 2.0])), max_size=12)
    shapes = st.one_of(st.tuples(st.integers(0, max_rows)), st.tuples(st.integers(0, max_rows), st.integers(0, 6)))
    return st.one_of(st.builds(lambda shape, f: np.resize(np.asarray(f or [0]), shape), shapes, fill), bad_values())


SEQUENCE_SET = {"tokens": np.array([[0, 1, 2], [2, 1, 0]]), "lengths": np.array([3, 2]),
                "component_ids": np.array([0, 1]), "component_names": ("a", "b"), "num_states": 3}


@fuzz("sequence_sets")
@given(data=st.data())
def test_sequence_set_construction(data):
    """One argument of a valid set replaced at a time: the error names it (a num_states below the token ids may
    be reported as the tokens' ids out of range), or the set is valid."""
    bad = {"tokens": arrays(), "lengths": arrays(), "component_ids": arrays(),
           "component_names": st.one_of(st.lists(st.text(max_size=2), max_size=3).map(tuple), bad_values()),
           "num_states": st.one_of(st.integers(-2, 12), bad_values())}
    arguments, name = data.draw(one_bad_argument(SEQUENCE_SET, bad))
    if name is None:
        SequenceSet(**arguments)
        return
    sequences, _ = expect_clear(lambda: SequenceSet(**arguments), name, *(("tokens",) if name == "num_states" else ()))
    if sequences is not None:
        assert sequences.transition_counts.sum() == (sequences.lengths - 1).sum()


@fuzz("mixture_spec")
@given(field=st.sampled_from(["forget2_length", "scale", "num_states", "leakage", "length", "seed"]),
       value=bad_values())
def test_paper_mixture_spec_arguments(field, value):
    # a huge scale is not an error here (the command lines estimate memory); only build, never sample
    spec, _ = expect_clear(lambda: paper_mixture_spec(**{field: value}), field)
    if spec is not None:
        assert all(c.num_train + c.num_test >= 1 for c in spec.components)


VALID_SPEC = {"name": "s", "question": "q", "num_states": 10, "leakage": 0.2, "seed": 0,
              "chains": {"r": "retain", "f": "forget1"},
              "components": [{"name": "retain", "chain": "r", "length": 5, "num_train": 8, "num_test": 2},
                             {"name": "forget", "chain": "f", "length": 5, "num_train": 8, "num_test": 2,
                              "role": "forget", "in_pretraining": True}],
              "methods": {"NPO": {"beta": 0.2}}, "dynamics": {"steps": 2}}
SPEC_PATHS = [(key,) for key in VALID_SPEC] + [("components", 0, key) for key in VALID_SPEC["components"][0]] + [
    ("components", 1, "role"), ("components", 1, "in_pretraining"), ("methods", "NPO"), ("methods", "NPO", "beta"),
    ("dynamics", "learning_rate"), ("dynamics", "optimizer"), ("chains", "r"), ("methods", "SimNPO")]


@fuzz("scenario_dicts")
@given(path=st.sampled_from(SPEC_PATHS), value=bad_values())
def test_scenario_dicts_with_one_bad_key(path, value):
    document = json.loads(json.dumps(VALID_SPEC))
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    leaf = [p for p in path if isinstance(p, str)][-1]  # the key that holds the bad value
    scenario, _ = expect_clear(lambda: scenario_from_dict(document), leaf)
    if scenario is not None:
        assert scenario.spec.num_states >= 3 and len(scenario.methods) >= 1


def file_contents():
    valid = json.dumps(VALID_SPEC).encode()
    return st.one_of(st.binary(max_size=64), st.integers(0, len(valid)).map(lambda n: valid[:n]),
                     st.sampled_from([b"", b"{}", b"[]", b"null", b"PK\x03\x04", b"\xff\xfe"]))


@fuzz("files")
@given(content=file_contents(), kind=st.sampled_from(["npz", "json"]))
def test_random_files_name_the_file(content, kind):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"input.{kind}")
        with open(path, "wb") as file:
            file.write(content)
        load = SequenceSet.load if kind == "npz" else load_scenario
        expect_clear(lambda: load(path), path)


@fuzz("model_folders")
@given(content=file_contents())
def test_random_config_json_in_a_model_folder_names_the_file(content):
    from llm.models import load_model

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "wb") as file:
            file.write(content)
        with open(os.path.join(folder, "model.safetensors"), "wb") as file:
            file.write(content[:8])
        with pytest.raises((ValueError, TypeError), match="config.json|model.safetensors|" + folder):
            load_model(folder, progress=False)


# ---------------------------------------------------------------------------------------------
# Entry points, one bad argument at a time: the error names THAT argument, or the call succeeds
# ---------------------------------------------------------------------------------------------


def expect_named(call, name: str | None):
    """``call()``'s result when ``name`` is None (every argument valid); otherwise ``call()`` must raise a
    ValueError / TypeError whose message names ``name`` as a word (not just any argument)."""
    if name is None:
        return call()
    with pytest.raises((ValueError, TypeError)) as raised:
        call()
    message = str(raised.value)
    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message), f"{message!r} does not name {name!r}"
    return None


@functools.lru_cache(maxsize=None)
def _tiny_problem(num_states: int) -> dict:
    """A tiny exact unlearning problem with V = ``num_states`` (built once): forget/retain sets, a fitted
    reference model and a test-set evaluator."""
    rng = np.random.default_rng(num_states)
    spec = MixtureSpec((Component("retain", random_chain(rng, num_states), 4, 6, 2),
                        Component("forget", random_chain(rng, num_states), 3, 6, 2, role="forget")), seed=0)
    train, test = spec.sample()
    reference = TabularMarkov.fit(train, smoothing=0.1)
    return {"forget": train.select("forget"), "retain": train.select("retain"), "reference": reference,
            "evaluator": ExactEvaluator(test, reference=reference)}


def _run_arguments(problem: dict, other: dict) -> tuple[dict, dict]:
    """Valid keyword arguments shared by ``unlearn`` and ``gradient_flow`` (NPO+RT on ``problem``), and strategies of
    bad values for each (``other``: a problem with another number of states)."""
    empty = problem["forget"].subset([])
    valid = {"model": problem["reference"], "objective": OBJECTIVES["NPO+RT"], "forget": problem["forget"],
             "retain": problem["retain"], "reference": problem["reference"], "evaluator": problem["evaluator"]}
    bad = {"model": st.sampled_from([None, "tabular", 5, problem["forget"], other["reference"]]),
           "objective": st.sampled_from(["NPO", None, 5, {"forget": "npo"}, OBJECTIVES]),
           "forget": st.sampled_from([empty, problem["forget"].tokens, None, "forget", [problem["forget"]],
                                      other["forget"]]),
           "retain": st.sampled_from([None, 5, empty, other["retain"], problem["retain"].tokens]),
           "reference": st.sampled_from([None, "reference", 5, other["reference"]]),
           "evaluator": st.sampled_from([5, "evaluator", problem["forget"], object()])}
    return valid, bad


@fuzz("unlearn")
@given(data=st.data())
def test_exact_unlearn_names_the_bad_argument(data):
    valid, bad = _run_arguments(_tiny_problem(3), _tiny_problem(4))
    valid |= {"config": DynamicsConfig(steps=1), "progress": False}
    bad |= {"config": st.sampled_from([None, {"steps": 1}, RunSettings(), "config"]),
            "progress": st.sampled_from(["no", 1, 0.0, "True"])}
    arguments, name = data.draw(one_bad_argument(valid, bad))
    trajectory = expect_named(lambda: unlearn(**arguments), name)
    if trajectory is not None:
        assert list(trajectory.steps) == [0, 1] and trajectory.diverged_at is None
        assert np.all(np.isfinite(trajectory.step_metrics["loss"]))


@fuzz("gradient_flow")
@given(data=st.data())
def test_gradient_flow_names_the_bad_argument(data):
    valid, bad = _run_arguments(_tiny_problem(3), _tiny_problem(4))
    valid |= {"times": data.draw(flow_times()), "method": "RK45", "rtol": 1e-6, "atol": 1e-8}
    bad |= {"times": bad_flow_times(), "method": st.sampled_from(["rk45", "", None, 5, "Euler"]),
            "rtol": bad_values().filter(lambda v: not (_is_real(v) and 0 < v < math.inf)),
            "atol": st.sampled_from([0.0, -1e-8, math.nan, math.inf, "1e-8", None, True])}
    arguments, name = data.draw(one_bad_argument(valid, bad))
    trajectory = expect_named(lambda: gradient_flow(**arguments), name)
    if trajectory is not None:
        np.testing.assert_array_equal(trajectory.steps, np.asarray(arguments["times"], dtype=np.float64))
        assert np.all(np.isfinite(trajectory.step_metrics["loss"]))


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@fuzz("sequence_subset")
@given(data=st.data())
def test_sequence_set_subset_checks_its_indices(data):
    sequences = _tiny_problem(3)["retain"]
    if data.draw(st.booleans()):
        indices = data.draw(row_indices(len(sequences)))
        subset = sequences.subset(indices)
        rows = np.flatnonzero(indices) if np.asarray(indices).dtype == bool else np.asarray(indices, dtype=np.int64)
        np.testing.assert_array_equal(subset.lengths, sequences.lengths[rows])
        np.testing.assert_array_equal(subset.component_ids, sequences.component_ids[rows])
        np.testing.assert_array_equal(subset.transition_counts, sequences.transition_counts[rows])
    else:
        expect_named(lambda: sequences.subset(data.draw(bad_row_indices(len(sequences)))), "indices")


@fuzz("empty_sequence_set")
@given(width=st.integers(0, 3), num_states=st.one_of(st.integers(1, 4), bad_values()))
def test_a_sequence_set_of_no_sequences(width, num_states):
    empty = np.zeros(0, dtype=np.int64)
    name = "tokens" if width < 2 else None
    if not (isinstance(num_states, int) and not isinstance(num_states, bool) and num_states >= 1):
        name = "num_states"
    build = lambda: SequenceSet(np.zeros((0, width), dtype=np.int64), empty, empty, ("a",), num_states)  # noqa: E731
    if name is None and num_states > 10**9:  # statistics too large to allocate may be refused, naming num_states
        sequences, _ = expect_clear(build, "num_states")
    else:
        sequences = expect_named(build, name)
    if sequences is not None:
        assert len(sequences) == 0 and sequences.transition_counts.shape == (0, num_states, num_states)


@fuzz("sequence_files")
@given(names=saved_component_names(), num_states=saved_num_states())
def test_sequence_set_load_checks_every_saved_field(names, num_states):
    saved = _tiny_problem(3)["retain"]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "set.npz")
        np.savez(path, tokens=saved.tokens, lengths=saved.lengths, component_ids=saved.component_ids,
                 component_names=np.asarray(names), num_states=num_states)
        try:
            loaded = SequenceSet.load(path)
        except ValueError as error:
            assert path in str(error) and re.search(r"component_names|num_states|tokens|component_ids", str(error))
            return
        assert isinstance(json.loads(names), list) and loaded.component_names == tuple(json.loads(names))
        assert num_states.shape == () and np.issubdtype(num_states.dtype, np.integer)
        assert loaded.num_states == int(num_states)
        np.testing.assert_array_equal(loaded.transition_counts[:, :3, :3], saved.transition_counts)


@fuzz("mixture_components")
@given(components=bad_values())
def test_mixture_spec_components(components):
    expect_named(lambda: MixtureSpec(components), "components")


@fuzz("objective")
@given(data=st.data())
def test_objective_names_the_bad_field(data):
    valid = {"forget": data.draw(st.sampled_from(sorted(losses.LOSSES))), "retain": data.draw(
        st.sampled_from([None, "nll", "kl"])), "forget_weight": 0.5, "retain_weight": 1.0,
        "beta": data.draw(betas(1e-38, 1e3)), "gamma": data.draw(gammas()), "alpha": 1.0}
    bad = {"forget": st.sampled_from(["NPO", "xyz", None, 5]), "retain": st.sampled_from(["xyz", 5, "", "NPO"]),
           "beta": bad_betas(), "gamma": st.sampled_from([math.nan, math.inf, "0", None, True, 10**400]),
           "forget_weight": bad_weights(), "retain_weight": bad_weights(), "alpha": bad_weights()}
    arguments, name = data.draw(one_bad_argument(valid, bad))
    objective = expect_named(lambda: Objective(**arguments), name)
    if objective is not None and objective.forget in ("ga", "npo", "simnpo"):
        logps, ref_logps, num_tokens = data.draw(moderate_sequence_batches())
        loss = objective.forget_losses(logps, num_tokens, ref_logps).mean()
        retain = None if objective.retain is None else torch.tensor(0.5, dtype=torch.float64)
        assert torch.isfinite(objective.total(loss, retain))


@fuzz("objective_total")
@given(data=st.data())
def test_objective_total_names_the_term_that_is_not_finite(data):
    objective = data.draw(st.sampled_from([OBJECTIVES["NPO"], OBJECTIVES["NPO+RT"]]))
    valid = {"forget_loss_mean": torch.tensor(1.5, dtype=torch.float64)}
    bad = {"forget_loss_mean": objective_terms()}
    if objective.retain is not None:
        valid["retain_value"] = torch.tensor(0.5, dtype=torch.float64)
        bad["retain_value"] = objective_terms()
    arguments, name = data.draw(one_bad_argument(valid, bad))
    total = expect_named(lambda: objective.total(**arguments), name)
    if total is not None:
        assert torch.isfinite(total).all()


@fuzz("scenario_memory")
@given(sizes=st.lists(st.tuples(scenario_sizes(), scenario_sizes()), min_size=2, max_size=2),
       scale=st.sampled_from([None, "0.5", "2"]))
def test_a_huge_json_scenario_names_its_sizes_not_an_unpassed_flag(sizes, scale, tmp_path_factory, capsys,
                                                                     monkeypatch):
    import markovsim.__main__ as cli

    def computed(*args, **kwargs):
        raise Computed

    monkeypatch.setattr(cli, "prepare", computed)
    document = json.loads(json.dumps(VALID_SPEC))
    for component, (num_train, num_test) in zip(document["components"], sizes):
        component |= {"num_train": num_train, "num_test": num_test}
    folder = tmp_path_factory.mktemp("s")
    path = str(folder / "huge.json")
    with open(path, "w") as file:
        json.dump(document, file)
    flags = [] if scale is None else ["--scale", scale]
    capsys.readouterr()
    try:
        status = cli.main(["run", path, "--out", str(folder / "run"), "--no-progress"] + flags)
    except Computed:
        return
    line = capsys.readouterr().err.strip()
    assert status == 2 and line.startswith("error: ") and "num_train" in line, line
    assert ("--scale" in line) == (scale is not None), line  # blames --scale only when it was passed
    assert scale is not None or path in line, line
    assert not os.path.exists(folder / "run")


# ---------------------------------------------------------------------------------------------
# Command lines, in-process
# ---------------------------------------------------------------------------------------------

FLAG_VALUES = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1.5", "abc", "", "1e30", "none", "true", "NPO=1",
                                         "NPO=abc", "XYZ=2", "gd", "adamw", "tabular", "2"]),
                        st.text(alphabet="0123456789.-e=abNPO", max_size=6))


class Computed(Exception):
    """Raised instead of computing: the command line accepted its arguments."""


def _cli_outcome(main, argv, capsys) -> None:
    capsys.readouterr()
    try:
        status = main(argv)
    except Computed:
        return
    except SystemExit as exit_:  # --help
        assert exit_.code == 0, argv
        return
    captured = capsys.readouterr()
    # computing is replaced by raising Computed, so a status of 0 means the command accepted and did nothing
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, status, captured.err)
    assert "Traceback" not in captured.err


def _arguments(data, flags):
    chosen = data.draw(st.lists(st.sampled_from(flags), max_size=3, unique=True))
    argv = []
    for flag in chosen:
        argv += [flag] + data.draw(st.lists(FLAG_VALUES, min_size=0, max_size=2))
    return argv


MARKOVSIM_FLAGS = ["--methods", "--betas", "--gamma", "--models", "--scale", "--seed", "--learning-rate", "--lr",
                   "--steps", "--optimizer", "--adam-eps", "--adam-betas", "--batch-size", "--eval-every",
                   "--max-grad-norm", "--divergence-logp-per-token", "--weight-decay", "--gradient", "--bogus"]


@fuzz("markovsim_cli")
@given(data=st.data())
def test_markovsim_cli_bad_arguments_are_one_error_line(data, tmp_path_factory, capsys, monkeypatch):
    import markovsim.__main__ as cli

    def computed(*args, **kwargs):
        raise Computed

    monkeypatch.setattr(cli, "prepare", computed)
    out = str(tmp_path_factory.mktemp("m") / "run")
    scenario = data.draw(st.sampled_from(["paper_short_forget2", "npo_divergence", "nope", out]))
    _cli_outcome(cli.main, ["run", scenario, "--out", out] + _arguments(data, MARKOVSIM_FLAGS), capsys)
    assert not os.path.exists(out)  # nothing is written before computing


LLM_FLAGS = ["--learning-rate", "--batch-size", "--steps", "--epochs", "--adam-eps", "--seed", "--preset",
             "--objective", "--beta", "--gamma", "--scale", "--device", "--mixed-precision", "--eval-every",
             "--warmup-steps", "--schedule", "--bogus"]


@fuzz("llm_cli")
@given(data=st.data())
def test_llm_cli_bad_arguments_are_one_error_line(data, tmp_path_factory, capsys, monkeypatch):
    import llm.__main__ as cli

    def computed(*args, **kwargs):
        raise Computed

    monkeypatch.setattr(cli, "_data", computed)
    out = str(tmp_path_factory.mktemp("l") / "run")
    command = data.draw(st.sampled_from(["pretrain", "unlearn"]))
    argv = [command, "--out", out, "--no-progress", "--num-threads", "1"] + _arguments(data, LLM_FLAGS)
    _cli_outcome(cli.main, argv, capsys)


def test_the_fuzz_budget_is_recorded():
    """benchmarks/RESULTS.md ("Fuzz suite") reports these numbers: a table row per input kind, the examples
    column summing to the total in its text."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "RESULTS.md")
    text = open(path).read()
    section = text[text.index("## Fuzz suite"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line.rstrip().endswith(" s |")]
    examples = [int(line.split("|")[-3].strip()) for line in rows]
    stated = int(re.search(r"\*\*(\d+)\s+examples", section).group(1))
    assert len(rows) == len(EXAMPLES) and sum(examples) == stated == sum(EXAMPLES.values()), (examples, stated)
