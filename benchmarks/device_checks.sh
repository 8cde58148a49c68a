#!/usr/bin/env bash
# One GPU session's checks (run by the device tool from the repository root; results under $OUT):
#   1. the CUDA tests (bf16 autocast pre-training/unlearning, cached vs live reference);
#   2. the paper-scale Fig. 5 family (markov_tradeoff, power_share, first_step, adam_eps) on the GPU,
#      worker processes sharing it; the output folder (PNG, PDF, caches, tables) comes back as a tarball;
#   3. the GPU part of benchmarks/llm_markov.py (gpt2-small bf16 step, cached vs live reference).
# Each stage has its own time limit, so whatever finished comes back.
set -u
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
FIGS=${FIGS:-/tmp/paper_output}
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
timeout ${CUDA_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_llm_cuda.py 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
start=$(date +%s)
timeout ${FIGURES_S:-330} python3 -m paper_figures --scale paper --device cuda --jobs ${JOBS:-12} --output "$FIGS" \
    --only ${ONLY:-markov_tradeoff power_share first_step adam_eps} > "$OUT/figures.log" 2>&1
echo "figures: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/figures.log"
tar czf "$OUT/paper_output.tgz" -C "$FIGS" . 2>/dev/null
timeout ${BENCH_S:-100} python3 benchmarks/llm_markov.py --device cuda --scale 0.1 --output "$OUT/llm_markov_cuda.json" \
    > "$OUT/benchmark.log" 2>&1; echo "benchmark: exit $?" >> "$OUT/benchmark.log"
tail -5 "$OUT/figures.log"; tail -20 "$OUT/benchmark.log"
