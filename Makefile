# Two commands set everything up:  `make demo` (the main job)  and  `make test` (the tests).
#
# Dependencies (torch alone is ~6 GB) live in one environment per lock-file content,
# outside the clone, reused by every clone and run while requirements/lock.txt is unchanged:
#   $(FP_ENV_ROOT)/deps-<hash of lock + python version>
# Each clone gets a light .venv that sees those packages and installs this project itself
# (editable), so `fp` is on .venv/bin. A deps environment is used only when complete
# (marker written last); an interrupted build is discarded and rebuilt.

PYTHON      ?= python3.11
FP_ENV_ROOT ?= $(HOME)/.cache/fp-envs
PYVER       := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK_HASH   := $(shell (cat requirements/lock.txt; $(PYTHON) -VV) | sha256sum | cut -c1-16)
DEPS        := $(FP_ENV_ROOT)/deps-$(LOCK_HASH)
VENV        := .venv
VPY         := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env demo test test-all lint bench lock clean

env: $(VENV)/.ready-$(LOCK_HASH)

# No file prerequisites: the hash in the path already stands for the lock's content, and a
# flock makes concurrent clones wait for one build instead of racing.
$(DEPS)/.complete:
	@mkdir -p "$(FP_ENV_ROOT)"
	@flock "$(FP_ENV_ROOT)/deps-$(LOCK_HASH).lock" sh -ec '\
	  test -f "$(DEPS)/.complete" && exit 0; \
	  echo "Building dependency environment $(DEPS) (first run only; several minutes)"; \
	  rm -rf "$(DEPS)"; \
	  $(PYTHON) -m venv "$(DEPS)"; \
	  "$(DEPS)/bin/python" -m pip install --quiet --upgrade pip; \
	  "$(DEPS)/bin/python" -m pip install --quiet -r requirements/lock.txt; \
	  touch "$(DEPS)/.complete"'

$(VENV)/.ready-$(LOCK_HASH): $(DEPS)/.complete pyproject.toml
	rm -rf "$(VENV)"
	$(PYTHON) -m venv "$(VENV)"
	echo "import site; site.addsitedir('$(abspath $(DEPS))/lib/python$(PYVER)/site-packages')" \
	  > "$(VENV)/lib/python$(PYVER)/site-packages/fp_deps.pth"
	"$(VPY)" -m pip uninstall --quiet --yes setuptools  # use the pinned one from the deps env
	"$(VPY)" -m pip install --quiet --no-deps --no-build-isolation -e .
	touch "$@"

demo: env
	$(VENV)/bin/fp demo

test: env
	"$(VPY)" -m pytest $(PYTEST_ARGS)

test-all: env
	"$(VPY)" -m pytest --run-slow $(PYTEST_ARGS)

# ruff over everything; mypy over forensics/plugin and forensics/stats (pyproject's [tool.mypy]).
lint: env
	"$(VPY)" -m ruff check .
	"$(VPY)" -m mypy

bench: env
	"$(VPY)" benchmarks/bench_ct.py
	"$(VPY)" benchmarks/bench_embed.py
	"$(VPY)" benchmarks/bench_attribution.py
	"$(VPY)" benchmarks/bench_baseline.py

# Re-resolve the pinned environment from pyproject's dependencies (needs a registry).
lock:
	rm -rf /tmp/fp-lock-venv && $(PYTHON) -m venv /tmp/fp-lock-venv
	/tmp/fp-lock-venv/bin/pip install --quiet --upgrade pip
	/tmp/fp-lock-venv/bin/pip install --quiet ".[dev]"
	(echo '# Pinned environment for development, tests and CI. Regenerate with `make lock`.'; \
	 /tmp/fp-lock-venv/bin/pip freeze --all --exclude-editable | grep -v -e '^fp-forensics' -e '^pip==' | sort -f) \
	 > requirements/lock.txt

clean:
	rm -rf "$(VENV)" build *.egg-info
