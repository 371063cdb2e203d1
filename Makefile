# `make run` sets up and starts the app; `make test` sets up and runs the test suite.
# Both create (or update) the virtual environment in .venv from requirements.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# `make run PORT=8502 ADDRESS=0.0.0.0` to change where the app listens
PORT ?= 8501
ADDRESS ?= 127.0.0.1

.PHONY: venv test run clean browser netns

# The real-browser tests (tests/test_browser.py) drive Debian's chromium; Playwright's own browser download
# is never used. `make browser` installs chromium with apt when it is missing and we are root (or have
# password-less sudo); otherwise it prints what to do and the tests skip (or fail when $CI is set).
CHROMIUM ?= /usr/bin/chromium

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

browser:
	@if [ -x "$(CHROMIUM)" ]; then \
		echo "browser: $(CHROMIUM) is installed"; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else SUDO=none; fi; \
		if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
			echo "browser: $(CHROMIUM) is missing and cannot be installed here (needs apt-get as root or" \
			     "password-less sudo): install Debian's chromium, or the real-browser tests will skip" \
			     "(fail when CI is set)"; \
		else \
			for i in 1 2 3; do $$SUDO apt-get update && break; echo "apt-get update failed (try $$i), retrying"; \
				sleep 5; done; \
			DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends chromium; \
		fi; \
	fi

test: $(STAMP) browser netns
	$(PY) -m pytest -q tests

# The Ray cluster tests (tests/test_batch_ray.py) run Ray in a network namespace of its own: `unshare`
# (util-linux) and `ip` (iproute2), as root. `make netns` installs iproute2 with apt when `ip` is missing.
netns:
	@if command -v ip >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1; then \
		echo "netns: ip and unshare are installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 util-linux; \
	else \
		echo "netns: ip (iproute2) or unshare (util-linux) is missing; the Ray cluster tests will fail without them"; \
	fi

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.headless true --server.port $(PORT) --server.address $(ADDRESS) --browser.gatherUsageStats false

clean:
	rm -rf $(VENV) .pytest_cache
