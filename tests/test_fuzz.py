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
import inspect
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from markovsim import losses
from markovsim.chains import MarkovChain
from markovsim.config import RunSettings
from markovsim.data import SequenceSet
from markovsim.dynamics import DynamicsConfig
from markovsim.scenarios import load_scenario, paper_mixture_spec, scenario_from_dict

EXAMPLES = {  # test -> max_examples (the suite's size: see benchmarks/RESULTS.md, "Fuzz suite")
    "config_fields": 2000, "model_preset": 600, "losses": 1500, "chains": 600, "sequence_sets": 800,
    "mixture_spec": 400, "scenario_dicts": 1000, "files": 300, "model_folders": 40,
    "markovsim_cli": 600, "llm_cli": 300}


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
    """``call()`` succeeds, or raises ValueError/TypeError naming one of ``names``; returns (result, error)."""
    try:
        return call(), None
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(str(name) in message for name in names), f"{type(error).__name__}: {message!r} names none of {names}"
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
    preset, _ = expect_clear(lambda: ModelPreset(**arguments), field, "num_heads", "architecture")
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


@fuzz("sequence_sets")
@given(tokens=arrays(), lengths=arrays(), ids=arrays(),
       names=st.one_of(st.just(("a", "b")), st.lists(st.text(max_size=2), max_size=3).map(tuple), bad_values()),
       num_states=st.one_of(st.integers(-2, 12), bad_values()))
def test_sequence_set_construction(tokens, lengths, ids, names, num_states):
    sequences, _ = expect_clear(lambda: SequenceSet(tokens, lengths, ids, names, num_states),
                                "tokens", "lengths", "component_ids", "component_names", "num_states")
    if sequences is not None:
        assert sequences.transition_counts.sum() == (sequences.lengths - 1).sum()


@fuzz("mixture_spec")
@given(field=st.sampled_from(["forget2_length", "scale", "num_states", "leakage", "length", "seed"]),
       value=bad_values())
def test_paper_mixture_spec_arguments(field, value):
    # a huge scale is not an error here (the command lines estimate memory); only build, never sample
    spec, _ = expect_clear(lambda: paper_mixture_spec(**{field: value}), field, "length", "num_sequences",
                           "num_states", "leakage")
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
    scenario, _ = expect_clear(lambda: scenario_from_dict(document), *[p for p in path if isinstance(p, str)],
                               "components", "methods", "duplicate")
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
    if status == 0:
        return
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
    """benchmarks/RESULTS.md ("Fuzz suite") reports these numbers."""
    assert sum(EXAMPLES.values()) == 8140
