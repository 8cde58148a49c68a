"""The ablation ladder on the paper's synthetic transformer, at a size a 2-core CPU finishes in well under an hour.

The paper scale of ``paper_figures.ablation_ladder`` runs the transformers through every optimiser and a
learning-rate grid on 15 seeds: thousands of unlearning runs, a GPU job. This script runs the part that
answers "do the exact models and the transformer agree once the optimiser and the learning rate are
matched": the paper-synthetic transformer (the paper's pre-training: 5 epochs, legacy AdamW lr 5e-4, batch
128) on a fifth of the paper's data, unlearned for 50 steps of 4 forget sequences under the three optimisers
of the ladder (legacy AdamW and torch AdamW over 5e-5 .. 5e-3 around the paper's 5e-4; gradient descent over
0.1 .. 1000 around 1), best learning rate chosen on three selection seeds, reported on ten paired seeds;
evaluated every step on 100 test sequences (as the quick Fig. 5). Writes the figure, ``_table.md``,
``_reach.csv``, ``_summary.json`` under the output stem and the cache in ``cache/`` beside it.

    python benchmarks/ablation_ladder_transformer_cpu.py docs/figures/ablation_ladder_transformer_cpu --jobs 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paper_figures import ablation_ladder  # noqa: E402
from paper_figures.transformer_runs import TransformerSettings  # noqa: E402

CONFIG = ablation_ladder.Config(
    scale=0.2, steps=50, simulator_sources=(),
    transformers=(TransformerSettings(preset="paper-synthetic", diagnostics_max_sequences=8,
                                      evaluation_subsample=100),),
    selection_seeds=(100, 101, 102), report_seeds=tuple(range(10)), transformers_on_cpu=True)


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_stem", help="where to write <stem>.png, <stem>_table.md, <stem>_reach.csv")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    arguments = parser.parse_args(argv)
    cache_stem = os.path.join(os.path.dirname(os.path.abspath(arguments.output_stem)), "cache",
                              os.path.basename(arguments.output_stem))
    start = time.perf_counter()
    ablation_ladder.compute(CONFIG, cache_stem, device="cpu", jobs=arguments.jobs)
    paths = ablation_ladder.plot(cache_stem, arguments.output_stem)
    print(f"wrote {', '.join(paths)} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
