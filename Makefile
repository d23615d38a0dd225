# Two commands: `make workbook` runs the notebooks, `make test` runs the tests.
# Both create .venv and install what is missing first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed before the project so pip keeps it. On Linux, PyPI's torch==2.13.0 is a CUDA
# build (this workbook's CI machines find a CPU build of it on disk). For another CUDA or a
# CPU-only build: make TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or .../whl/cpu)
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
export SAELAB_PROFILE ?=

.PHONY: workbook test lint setup clean-runs

# One stamp per torch choice, so `make setup TORCH=... TORCH_INDEX=...` reinstalls torch on an
# existing .venv instead of doing nothing.
empty :=
space := $(empty) $(empty)
TORCH_STAMP := $(VENV)/.torch-$(subst $(space),_,$(subst /,_,$(subst :,_,$(subst =,_,$(TORCH)$(TORCH_INDEX)))))

$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.torch-*
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

# uv resolves and installs the rest in seconds (pip took minutes); torch is already there and
# satisfies the project's range, so uv keeps it.
$(VENV)/.installed: pyproject.toml $(TORCH_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Executes every notebook in order, headless, in the selected profile ($$SAELAB_PROFILE or
# auto-detected); executed copies go to runs/<profile>/notebooks, figures to figures/<profile>.
workbook: setup
	$(PY) -m saelab.workbook $(NOTEBOOKS)

# Unit tests and every notebook under nbmake. The notebooks run the offline pipeline at a smaller setting,
# profile offline-test (saelab/config.py: offline with shorter training), so that `make workbook` can train
# for real while the tests stay fast. They run from scratch in runs/test (SAELAB_ROOT), so tests never
# rewrite the committed figures/. Both run at once (each keeps about one core busy); the unit tests'
# report is printed when both have ended.
TEST_ROOT := $(CURDIR)/runs/test
TEST_PROFILE := offline-test
test: setup
	rm -rf $(TEST_ROOT) && mkdir -p $(TEST_ROOT)
	SAELAB_PROFILE=offline WANDB_MODE=disabled $(PY) -m pytest tests > $(TEST_ROOT)/unit-tests.log 2>&1 & unit=$$!; \
	SAELAB_ROOT=$(TEST_ROOT) SAELAB_PROFILE=$(TEST_PROFILE) WANDB_MODE=disabled \
		$(PY) -m pytest --nbmake --nbmake-timeout=900 $(NOTEBOOKS); notebooks=$$?; \
	wait $$unit; units=$$?; cat $(TEST_ROOT)/unit-tests.log; \
	test $$units -eq 0 && test $$notebooks -eq 0

lint: setup
	$(PY) -m ruff check saelab tests benchmarks

clean-runs:
	rm -rf runs
