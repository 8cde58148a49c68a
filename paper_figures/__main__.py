"""Command line: regenerate figures into ``paper_figures/output`` with a manifest."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from markovsim.results import atomic_write_json, metadata_block
from markovsim.runtime import DEVICES

from . import FIGURES

HERE = os.path.dirname(os.path.abspath(__file__))
SCALES = ("tiny", "quick", "paper")


def resolve_device(device: str) -> str:
    """:func:`markovsim.runtime.resolve_device`, its ValueError as the command line's exit message."""
    from markovsim.runtime import resolve_device as resolve

    try:
        return resolve(device)
    except ValueError as error:
        raise SystemExit(f"--device: {error}") from None


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m paper_figures", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURES), metavar="NAME",
                        help=f"figures to make (default: all of {', '.join(FIGURES)})")
    parser.add_argument("--scale", choices=SCALES, default="quick",
                        help="tiny (smoke test), quick (default, minutes on a CPU) or paper (the paper's sizes)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (CUDA if available, default), cpu or cuda")
    parser.add_argument("--recompute", action="store_true", help="ignore cached numbers and recompute them")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes for independent run sets (one torch thread each; default 1)")
    parser.add_argument("--output", default=os.path.join(HERE, "output"), help="output folder")
    parser.add_argument("--tofu-run", metavar="DIR",
                        help="a TOFU protocol run folder (python -m llm.tofu run ...; "
                             "python -m llm.tofu.bias --run DIR) for the TOFU panels of tofu_bias and relearning "
                             "(default: simulator panels only) and for tofu_protocol (default: the committed CPU "
                             "protocol run)")
    return parser.parse_args(argv)


def make_figure(name: str, scale: str, device: str, output: str, recompute: bool, jobs: int = 1,
                tofu_run: str | None = None) -> dict:
    """Compute (or reuse) one figure's cache and plot it; returns its manifest entry.

    ``tofu_run`` (a TOFU run folder) goes into the config of the figures with TOFU panels (``USES_TOFU_RUN``).
    """
    module = FIGURES[name]
    config = module.CONFIGS[scale]
    if getattr(module, "USES_TOFU_RUN", False) and tofu_run is not None:
        config = dataclasses.replace(config, tofu_run=os.path.abspath(tofu_run))
    cache_stem = os.path.join(output, "cache", f"{name}_{scale}")
    start = time.perf_counter()
    reused = not recompute and os.path.exists(cache_stem + ".json") and _same_config(cache_stem, config)
    if not reused:
        module.compute(config, cache_stem, device=device, recompute=recompute, jobs=jobs)
    paths = module.plot(cache_stem, os.path.join(output, name))
    return {"name": name, "title": module.TITLE, "scale": scale, "config": metadata_block(config)["config"],
            "device": device, "runtime_s": round(time.perf_counter() - start, 3), "reused_cache": reused,
            "cache": cache_stem + ".json", "files": [os.path.relpath(p, output) for p in paths]}


def _same_config(cache_stem: str, config) -> bool:
    from markovsim.results import read_json, to_strict_json

    try:  # compare as JSON reads back (tuples become lists), else a tuple-valued config never matches
        return read_json(cache_stem + ".json").get("config") == to_strict_json(metadata_block(config)["config"])[0]
    except ValueError:
        return False


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: the command line never opens a window
    arguments = parse_arguments(argv)
    device = resolve_device(arguments.device)
    if arguments.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {arguments.jobs}")
    names = arguments.only or list(FIGURES)
    if arguments.tofu_run is not None and not os.path.isdir(arguments.tofu_run):
        raise SystemExit(f"--tofu-run: {arguments.tofu_run} is not a folder (give a TOFU protocol run folder)")
    tofu_figures = [name for name in names if getattr(FIGURES[name], "USES_TOFU_RUN", False)
                    and not hasattr(FIGURES[name], "COMMITTED_RUN")]  # those without a run of their own
    if tofu_figures and arguments.tofu_run is None:
        print(f"[paper_figures] no --tofu-run: {', '.join(tofu_figures)} get their simulator panels only; for the "
              f"TOFU panels run `make tofu-figures` (or python -m paper_figures --only {' '.join(tofu_figures)} "
              f"--tofu-run DIR after a TOFU run and python -m llm.tofu.bias --run DIR)", flush=True)
    entries = []
    for name in names:
        print(f"[paper_figures] {name} ({arguments.scale}, {device}) ...", flush=True)
        try:
            entries.append(make_figure(name, arguments.scale, device, arguments.output, arguments.recompute,
                                       arguments.jobs, arguments.tofu_run))
        except ValueError as error:  # a TOFU run folder without the needed results: one line, no traceback
            if not getattr(FIGURES[name], "USES_TOFU_RUN", False) or arguments.tofu_run is None:
                raise
            raise SystemExit(f"[paper_figures] {name}: {error}") from None
        print(f"[paper_figures]   wrote {', '.join(entries[-1]['files'])} in {entries[-1]['runtime_s']} s", flush=True)
    atomic_write_json(os.path.join(arguments.output, "manifest.json"),
                      metadata_block({"scale": arguments.scale, "device": device, "only": names}, figures=entries))
    print(f"[paper_figures] manifest: {os.path.join(arguments.output, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
