# Two set-up commands: `make serve` and `make test` (`make help` lists the others, from the `## ` after each
# target). Each builds what it needs in a virtual environment cached outside the clone, keyed by the hash of its
# pinned requirements file, so a fresh machine installs everything and a warm one installs nothing. The project
# itself runs from the checkout (PYTHONPATH), never installed into the shared cache.
PYTHON ?= python3
CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vitserve
key = $(shell cat $(1) | sha256sum | cut -c1-12)-py$(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])')
DEV_VENV := $(CACHE)/venv-dev-$(call key,requirements/dev.txt)
SERVE_VENV := $(CACHE)/venv-serve-$(call key,requirements/serve.txt)
RUN = PYTHONPATH=$(CURDIR):$(CURDIR)/client PYTHONDONTWRITEBYTECODE=1

.PHONY: serve test test-fast lint typecheck docs dev-env serve-env clean-cache default-model large-model bench browser docker-smoke k8s-validate gpu-check requirements help
# exec: the server is make's own child, and VITSERVE_EXIT_WITH_PARENT makes it drain and exit when make is
# stopped (a supervisor's SIGTERM to make is not passed on to children).
serve: serve-env ## serve models/ on http://127.0.0.1:8000 (VITSERVE_* settings apply)
	exec env $(RUN) VITSERVE_EXIT_WITH_PARENT=1 $(SERVE_VENV)/bin/python -m service

test: dev-env browser ## the whole test suite (PYTEST_ARGS passes options to pytest)
	$(RUN) $(DEV_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The fast layer: unit and in-process tests only, no server process, export, container, browser or other slow
# test (the markers are in pyproject.toml; tests/conftest.py applies them).
FAST = not (server or export or container or browser or slow)
test-fast: dev-env ## the fast layer: unit and in-process tests (no server process, export, container, browser)
	$(RUN) $(DEV_VENV)/bin/python -m pytest -q -m "$(FAST)" $(PYTEST_ARGS)

# What mypy checks, and how strictly, is in pyproject.toml ([tool.mypy]).
MYPY = $(RUN) $(DEV_VENV)/bin/python -m mypy

lint: dev-env ## ruff over the whole tree, then mypy
	$(DEV_VENV)/bin/python -m ruff check vit_artifact service model_export client tests benchmarks docs docker
	$(MYPY)

typecheck: dev-env ## mypy alone
	$(MYPY)

# The headline benchmark, quick: the default model, FP32 and INT8, over HTTP against in-process onnxruntime, the
# GEMM roofline and the peers (FastAPI + PyTorch eager, BentoML); a few minutes, and on the first run the time to
# install BentoML into its own environment. Written to BENCH_OUT, so that the committed record in
# benchmarks/results/ changes only when asked (BENCH_OUT=benchmarks/results). benchmarks/README.md has the rest.
BENCH_OUT ?= build/bench
bench: dev-env ## the quick serving benchmark (benchmarks/serving.py --quick), results in build/bench
	$(RUN) $(DEV_VENV)/bin/python benchmarks/serving.py --quick --out $(BENCH_OUT)

docs: dev-env ## regenerate README's settings table, and the figures and tables of docs/ and README
	$(RUN) $(DEV_VENV)/bin/python docs/settings_table.py
	$(RUN) $(DEV_VENV)/bin/python docs/make_docs.py

default-model: dev-env ## train and export the default digits model into models/digits-vit
	$(RUN) $(DEV_VENV)/bin/python -m model_export train-default --out models/digits-vit --int8

# The INT8 benchmark model (width 192, where INT8 pays on a CPU): too large to commit (11 MB), so re-created here
# (about 13 minutes on 2 shared cores, deterministic) with its INT8 variant, both scored on the held-out canvases
# (add --calibrate percentile for static INT8). The numbers are in README's INT8 section.
large-model: dev-env ## the width-192 INT8 benchmark model, into build/models (about 13 minutes)
	$(RUN) $(DEV_VENV)/bin/python -m model_export train-default --size large --out build/models/digits-vit-large --int8

dev-env: $(DEV_VENV)/.ready ## the development environment (tests, export, lint), built once per requirements

# The real image: docker/smoke.sh builds the root Dockerfile with podman (no Docker engine, no registry: a
# debootstrap'd Debian base cached outside the clone), runs it with buildah and checks it from the host. Needs
# root; installs podman, buildah and debootstrap where missing. `make test` runs the same test.
docker-smoke: dev-env ## build the container image and check it from the host (needs root)
	$(RUN) $(DEV_VENV)/bin/python -m pytest -q -s tests/docker/test_image.py

# Every kustomization in docker/k8s built (kubectl kustomize) and validated offline against the Kubernetes schemas,
# and every image tag under docker/ checked against service.__version__.
k8s-validate: dev-env ## build and validate the Kubernetes manifests offline
	$(RUN) $(DEV_VENV)/bin/python -m pytest -q tests/docker/test_k8s.py tests/docker/test_container_files.py tests/docker/test_versions.py

# GPU serving in one short run (docker/gpu_check.py): here it prepares build/gpu-check, what a GPU machine without
# a package registry needs, in parts for the device tool's calls, and prints the calls (also in plan.md there).
# PROVIDER=cpu runs the same check end to end on this machine's CPU, with the default model and its FP16 variant.
gpu-check: dev-env ## prepare the GPU check for a GPU machine (PROVIDER=cpu: run it here, a dry run under 2 minutes)
	$(RUN) $(DEV_VENV)/bin/python docker/gpu_check.py prepare --provider $(or $(PROVIDER),cuda)
	$(if $(filter cpu,$(PROVIDER)),$(RUN) $(DEV_VENV)/bin/python docker/gpu_check.py run --bundle build/gpu-check-cpu \
	  --report test-artifacts/gpu-check-cpu.json)

# The demo page's tests drive Debian's Chromium through Playwright (never `playwright install`, which downloads
# a browser of its own). Installed only where it is missing; where it cannot be (no root, no mirror), those
# tests skip and say why, and `make test` goes on.
browser: ## install Debian's Chromium for the demo page's tests, where missing
	@[ -x /usr/bin/chromium ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: the browser tests will skip"

serve-env: $(SERVE_VENV)/.ready ## the serving environment, built once per requirements

# requirements/*.txt are generated: pyproject.toml's lists are the source (serve.txt from `dependencies`, dev.txt
# from `dependencies` + the export and dev extras). pip-compile keeps every pin already in a file, so adding a
# dependency pins only what it brings; move one pin with COMPILE_ARGS="--upgrade-package NAME". It resolves
# through pip's own configuration (the same indexes `make serve` and `make test` install from).
PIP_TOOLS := $(CACHE)/pip-tools-7.6.2
COMPILE = CUSTOM_COMPILE_COMMAND="make requirements" $(PIP_TOOLS)/bin/pip-compile --quiet --strip-extras \
	--annotation-style=line --no-emit-index-url --no-emit-find-links $(COMPILE_ARGS)
requirements: $(PIP_TOOLS)/.ready ## regenerate requirements/*.txt from pyproject.toml
	$(COMPILE) --output-file requirements/serve.txt pyproject.toml
	$(COMPILE) --extra export --extra dev --output-file requirements/dev.txt pyproject.toml

$(PIP_TOOLS)/.ready:
	@rm -rf $(PIP_TOOLS) && $(PYTHON) -m venv $(PIP_TOOLS)
	@bash -c 'set -o pipefail; $(PIP_TOOLS)/bin/python -m pip install -q --disable-pip-version-check \
	  pip==25.2 pip-tools==7.6.2 2>&1 | { grep -v "^WARNING: Location" || true; }'
	@touch $@

# Built in a temporary folder and renamed into place under a lock, so two clones never share a half-built env.
$(CACHE)/venv-%/.ready:
	@mkdir -p $(CACHE)
	@flock $(CACHE)/.lock bash -c '\
	  set -o pipefail; \
	  set -e; dest=$(CACHE)/venv-$*; [ -f $$dest/.ready ] && exit 0; \
	  req=requirements/$$(echo $* | cut -d- -f1).txt; tmp=$$dest.tmp; rm -rf $$tmp $$dest; \
	  echo "installing $$req into $$dest (first run on this machine only)"; \
	  $(PYTHON) -m venv $$tmp; \
	  $$tmp/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	  $$tmp/bin/python -m pip install -q --disable-pip-version-check -r $$req 2>&1 | { grep -v "^WARNING: Location" || true; }; \
	  $$tmp/bin/python -c "import numpy, onnxruntime, PIL, fastapi" ; \
	  mv $$tmp $$dest; touch $$dest/.ready'

clean-cache: ## remove the cached virtual environments
	rm -rf $(CACHE)/venv-*

help: ## this list
	@awk -F ':[^#]*## ' '/^[a-z][a-z0-9-]*:[^=]*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
