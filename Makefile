# megaponder developer entry points. Every target creates/updates .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# Where torch comes from. Empty: pip's own configuration (on the project's CPU machines it serves
# the CPU wheel). Elsewhere PyPI's Linux torch is the large CUDA build; for a CPU-only build use
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (used for torch alone, before everything else; the pins then find it installed).
TORCH_INDEX ?=

.PHONY: setup train test test-fast clean-runs

# The stamp depends on the requirement files, so `make setup` is a no-op when
# nothing changed and re-installs when a pin moves; and on the C extension's source, which
# `pip install -e .` compiles in place (an edited .c is otherwise never rebuilt).
$(STAMP): setup.py requirements/cpu.txt requirements/constraints.txt requirements/nodeps.txt \
		megaponder/data/_sample_index.c
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(BIN)/pip install -q --index-url $(TORCH_INDEX) -c requirements/constraints.txt torch)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -r requirements/cpu.txt -c requirements/constraints.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c "import torch; assert torch.version.cuda is None or torch.cuda.is_available(), 'a CUDA torch on a CPU machine'"
	@touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(BIN)/python tools/prepare_demo_corpus.py --output-dir data/demo
	$(BIN)/megaponder train --config examples/configs/quickstart.yml --set train.resume=auto

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# The in-process tier for the edit-test loop: no test that starts a process and none of the
# long ones (markers set in tests/conftest.py). `make test` stays the full suite and CI.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m inprocess tests $(PYTEST_ARGS)

clean-runs:
	rm -rf runs/

# docker/Dockerfile built with buildah on a CPU stand-in of its NGC base (Debian, CPU torch, NGC's
# pip constraint file), then trained inside (tests/cluster/test_image.py; docker/README.md).
# Needs root; installs buildah and debootstrap from apt when missing. Cached: a second run with
# unchanged inputs builds nothing.
.PHONY: image-check
image-check: $(STAMP)
	$(BIN)/python -m pytest -q -m image tests/cluster/test_image.py $(PYTEST_ARGS)
