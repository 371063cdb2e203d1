# `make run` sets up and starts the app; `make test` sets up and runs the test suite.
# Both create (or update) the virtual environment in .venv from requirements.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# `make run PORT=8502 ADDRESS=0.0.0.0` to change where the app listens
PORT ?= 8501
ADDRESS ?= 127.0.0.1

.PHONY: venv test run clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.headless true --server.port $(PORT) --server.address $(ADDRESS) --browser.gatherUsageStats false

clean:
	rm -rf $(VENV) .pytest_cache
