"""TOFU training stages under data parallelism: 2 CPU processes (accelerate, gloo) match 1 process.

The same pattern as tests/test_llm_distributed.py (processes started like ``torchrun``: RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), on the TOFU path: a tiny random Llama with the
word-level chat tokenizer of test_tofu_fixtures, 3 fine-tuning steps (llm.tofu.finetune.finetune) and
then 3 NPO+RT unlearning steps with cached reference log-probs (llm.tofu.finetune.unlearn), with odd
global batch sizes so the two shards differ in size.

Every process builds the same global batch from the seed and keeps its shard; every loss is normalised
by the GLOBAL counts, so the shard values summed over processes (accelerate's all-reduce) equal the
one-process value, and the averaged gradients (DDP) times 2 equal the one-process gradient. The only
difference is the order of float32 additions (two partial sums instead of one, and DDP's gradient
all-reduce), ~1e-7 relative per addition. Measured over these 6 AdamW steps (lr 1e-3): losses differ by
at most 1.5e-6 (the NPO forget term, where the summed answer log-prob minus its cached reference cancels
~100 token log-probs), gradient norms by 3e-7 relative, final weights by 1.3e-7. The tolerances (losses
rtol 1e-4 + atol 1e-5, weights atol 1e-6) leave a margin of ~7x over that and are still far below any
real mismatch (a wrong normaliser or a duplicated shard changes the losses by tens of percent).
"""

import json
import os
import sys

import numpy as np
import pytest
from test_tofu_fixtures import tiny_llama, tiny_tokenizer
from two_processes import ROOT, launch_two

STEP_KEYS = ("total", "grad_norm", "learning_rate")
UNLEARN_KEYS = STEP_KEYS + ("forget", "retain", "logp_per_token")


def train_tofu(output: str, run_dir: str) -> None:
    """Fine-tune 3 steps then NPO+RT 3 steps on TOFU pairs; process 0 writes the final weights to ``output``."""
    import torch

    from llm.config import TrainConfig
    from llm.tofu.data import load_split
    from llm.tofu.finetune import finetune, unlearn
    from markovsim.losses import get_objective

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer))
    items = load_split("forget01")
    common = dict(device="cpu", progress=False, learning_rate=1e-3, steps=3, checkpoint_every=2)
    first = finetune(model, tokenizer, items[:11], TrainConfig(batch_size=5, **common),
                     os.path.join(run_dir, "finetune"))
    second = unlearn(model, tokenizer, get_objective("NPO+RT", beta=0.5), items[11:18], items[18:27],
                     TrainConfig(batch_size=5, retain_batch_size=3, eval_batch_size=4, **common),
                     os.path.join(run_dir, "unlearn"))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "outcomes": [first.steps, first.last_loss, second.steps, second.last_loss]}, output)


def run_protocol(writes: str, *argv: str) -> None:
    """``python -m llm.tofu`` in this process, logging every file write (model folders, JSON/Markdown) to ``writes``.

    The two writers (``llm.models.save_model``; ``markovsim.results.atomic_output``, under every JSON
    and Markdown result) are replaced by logging wrappers in every loaded module that imported them by
    name, and restored afterwards; the files are still written.
    """
    import markovsim.results
    from llm import models

    out = argv[argv.index("--out") + 1]

    def logged(function, position):
        def wrapper(*args, **kwargs):
            with open(writes, "a") as log:
                log.write(os.path.relpath(os.fspath(args[position]), out) + "\n")
            return function(*args, **kwargs)
        return wrapper

    from llm.tofu import __main__ as cli  # loads protocol, report, finetune, model

    replaced = []
    for original, position in ((models.save_model, 1), (markovsim.results.atomic_output, 0)):
        wrapper = logged(original, position)
        for module in list(sys.modules.values()):
            if getattr(module, original.__name__, None) is original and module.__name__.startswith(("llm", "markov")):
                replaced.append((module, original.__name__, original))
                setattr(module, original.__name__, wrapper)
    try:
        assert cli.main(list(argv)) == 0
    finally:
        for module, name, original in replaced:
            setattr(module, name, original)


def launch(function: str, *args: str) -> list[str]:
    """Run ``test_tofu_distributed.<function>(*args)`` in 2 processes (gloo on CPU); their outputs."""
    return launch_two("test_tofu_distributed", function, *args)


def _train_records(run_dir) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r.get("kind") == "train"]


@pytest.mark.slow
def test_tofu_finetune_and_unlearn_on_two_processes_match_one(tmp_path):
    import torch

    one, two = tmp_path / "one", tmp_path / "two"
    train_tofu(str(tmp_path / "one.pt"), str(one))
    launch("train_tofu", str(tmp_path / "two.pt"), str(two))
    for stage, keys in (("finetune", STEP_KEYS), ("unlearn", UNLEARN_KEYS)):
        single, double = _train_records(one / stage), _train_records(two / stage)
        # written once, by process 0: one record per step, no duplicates from process 1
        assert [r["step"] for r in double] == [r["step"] for r in single] == [0, 1, 2]
        for key in keys:
            np.testing.assert_allclose([r[key] for r in double], [r[key] for r in single], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{stage} {key}")
        checkpoints = two / stage / "checkpoints"
        assert sorted(os.listdir(checkpoints)) == ["step-0000002"]  # no temporary folder left by either process
        assert sorted(os.listdir(checkpoints / "step-0000002")) == ["rng-0.pt", "rng-1.pt", "state.pt"]
    single, double = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    np.testing.assert_allclose(double["outcomes"], single["outcomes"], rtol=1e-4, atol=1e-5)
    assert single["outcomes"][0] == single["outcomes"][2] == 3
    for name, value in single["state"].items():
        torch.testing.assert_close(double["state"][name], value, rtol=0, atol=1e-6, msg=name)
    # the run really trained: 6 AdamW steps at lr 1e-3 moved the weights by ~1e-3 each
    start = tiny_llama(len(tiny_tokenizer(chat=True)))
    moved = max(float((value - start.state_dict()[name]).abs().max()) for name, value in single["state"].items())
    assert moved > 1e-3


TINY = ["--limit", "4", "--batch-size", "5", "--finetune-steps", "2", "--unlearn-steps", "2", "--max-new-tokens", "3",
        "--eval-batch-size", "64", "--no-progress", "--device", "cpu", "--split", "forget01", "--methods", "NPO+RT",
        "--relearn-steps", "0", "1"]


@pytest.mark.slow
def test_protocol_on_two_processes_writes_each_file_once_and_matches_one(tmp_path):
    """The whole tiny protocol under a 2-process launch: every stage runs on both processes, process 0 alone
    writes config, stage records, model folders and results, and the trained models equal a 1-process run's."""
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "base"
    tokenizer = tiny_tokenizer(chat=True)
    tiny_llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    one, two = tmp_path / "one", tmp_path / "two"
    run_protocol(str(tmp_path / "writes-one"), "run", "--out", str(one), "--model", str(base), *TINY)
    # each process appends its writes to writes-<RANK>: the function reads RANK itself
    outputs = launch("run_protocol_ranked", str(tmp_path / "writes"), "run", "--out", str(two), "--model", str(base),
                     *TINY)
    summaries = [json.loads(text.strip().splitlines()[-1]) for text in outputs]
    stages = ["target", "retain", "unlearn-npo-rt", "eval-target", "eval-retain", "eval-npo-rt", "relearn-target",
              "relearn-retain", "relearn-npo-rt", "report"]
    assert summaries[0]["ran"] == summaries[1]["ran"] == stages  # the same view of what is done, on both
    assert not os.path.exists(tmp_path / "writes-1")  # process 1 wrote nothing
    written = sorted(open(tmp_path / "writes-0").read().split())
    assert written == sorted(open(tmp_path / "writes-one").read().split())  # what one process writes, once
    assert {"config.json", "results.json", "results.md", "models/target", "stages/report.json"} <= set(written)
    for name in ("target", "retain", "npo-rt"):
        single, double = (load_file(path / "models" / name / "model.safetensors") for path in (one, two))
        for key, value in single.items():
            torch.testing.assert_close(double[key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")
    records = [json.load(open(path / "stages" / "unlearn-npo-rt.json")) for path in (one, two)]
    assert records[1]["last_loss"] == pytest.approx(records[0]["last_loss"], rel=1e-4, abs=1e-5)


def run_protocol_ranked(writes: str, *argv: str) -> None:
    """:func:`run_protocol` logging to ``<writes>-<RANK>``."""
    run_protocol(f"{writes}-{os.environ['RANK']}", *argv)


# ----- the shipped accelerate configs and the FSDP save path (no GPU here: what can be checked on CPU) -----

ACCELERATE_DIR = os.path.join(ROOT, "llm", "tofu", "accelerate")


def _launch_environment(name: str) -> dict:
    """The environment ``accelerate launch --config_file <name>.yaml --num_processes 4 -m llm.tofu run`` gives
    the training processes, through accelerate's own config loader and launcher (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(ACCELERATE_DIR, f"{name}.yaml"),
                                               "--num_processes", "4", "-m", "llm.tofu", "run", "--out", "x"])
    args, _, _ = _validate_launch_command(args)
    assert args.module and args.training_script == "llm.tofu" and args.num_processes == 4
    return prepare_multi_gpu_env(args)


def test_shipped_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp, fsdp = (load_config_from_file(os.path.join(ACCELERATE_DIR, f"{n}.yaml")) for n in ("ddp", "fsdp"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.fsdp_config == {}
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # get_state_dict gathers full weights
    for config in (ddp, fsdp):
        # llm autocasts to bf16 itself (float32 master weights); accelerate must not add its own mixed precision
        assert config.mixed_precision == "no" and config.num_machines == 1 and not config.use_cpu
    environment = _launch_environment("fsdp")
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert environment["ACCELERATE_MIXED_PRECISION"] == "no"
    assert "ACCELERATE_USE_FSDP" not in _launch_environment("ddp")


def test_accelerate_configs_are_package_data():
    """pyproject's package-data globs for llm.tofu cover both yaml files (so an installed package ships them)."""
    import ast
    import fnmatch
    import re

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    section = text[text.index("[tool.setuptools.package-data]"):]
    patterns = ast.literal_eval(re.search(r'^"llm\.tofu" = (\[.*\])$', section, re.MULTILINE).group(1))
    for name in ("accelerate/ddp.yaml", "accelerate/fsdp.yaml"):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_save_trained_writes_the_gathered_state_dict_when_given(tmp_path):
    """The FSDP path of save_trained: the weights written are outcome.state_dict, not the model object's."""
    import torch
    from safetensors.torch import load_file

    from llm.tofu.finetune import TrainOutcome, save_trained

    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer))
    expected = {k: v + 1.0 for k, v in model.state_dict().items()}
    gathered = dict(expected)  # save_pretrained may pop entries of the dict it is given
    save_trained(model, tokenizer, tmp_path / "sharded", TrainOutcome(1, 0.0, state_dict=gathered))
    save_trained(model, tokenizer, tmp_path / "plain", TrainOutcome(1, 0.0))
    sharded, plain = (load_file(tmp_path / name / "model.safetensors") for name in ("sharded", "plain"))
    assert sharded.keys() == plain.keys() == expected.keys()
    for key, value in sharded.items():
        torch.testing.assert_close(value, expected[key])
        torch.testing.assert_close(plain[key], model.state_dict()[key])
    assert (tmp_path / "sharded" / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="LoRA under FSDP"):
        save_trained(model, tokenizer, tmp_path / "lora", TrainOutcome(1, 0.0, state_dict=expected), merge_lora=True)


def test_fsdp_gathers_weights_and_refuses_checkpoints(monkeypatch):
    """Under FSDP a stage's outcome carries accelerator.get_state_dict(model) and checkpoint_every is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import llm.tofu.finetune as finetune_module
    from llm.config import TrainConfig

    calls = []
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP,
                                  get_state_dict=lambda model: calls.append(model) or {"w": model})
    outcome = finetune_module._outcome(SimpleNamespace(accelerator=accelerator, model="wrapped"), 3, 0.5)
    assert outcome.state_dict == {"w": "wrapped"} and calls == ["wrapped"] and outcome.steps == 3
    accelerator.distributed_type = DistributedType.MULTI_CPU
    assert finetune_module._outcome(SimpleNamespace(accelerator=accelerator, model="m"), 3, 0.5).state_dict is None
    monkeypatch.setattr(finetune_module, "_is_fsdp", lambda session: True)
    tokenizer = tiny_tokenizer(chat=True)
    from llm.tofu.data import load_split

    with pytest.raises(ValueError, match="checkpoint_every is not supported under FSDP"):
        finetune_module.finetune(tiny_llama(len(tokenizer)), tokenizer, load_split("forget01")[:4],
                                 TrainConfig(batch_size=2, steps=1, checkpoint_every=1, device="cpu", progress=False))
    pytest.importorskip("peft")
    from llm.lora import LoraSettings, add_lora

    with pytest.raises(ValueError, match="LoRA under FSDP is not supported"):
        finetune_module.finetune(add_lora(tiny_llama(len(tokenizer)), LoraSettings(rank=2)), tokenizer,
                                 load_split("forget01")[:4],
                                 TrainConfig(batch_size=2, steps=1, device="cpu", progress=False))
