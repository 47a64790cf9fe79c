# The README's commands. Everything a fresh Debian 12 machine needs is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := gcc libc6-dev libatomic1 libxen-dev libdrm-dev xenstore-utils edid-decode

.PHONY: test demo bench lint apt-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# System packages the tests compile or run against (golden vectors from Xen's headers,
# the xenstore-utils cross-check). Installed only when missing; needs root or sudo.
apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The main job: the daemon against the simulated Xen and two simulated guests for 10 s,
# PNG snapshots of every output in demo-out/.
demo: $(STAMP)
	$(VENV)/bin/displback demo --seconds 10 --snapshots demo-out

# Speed and memory goals: one run prints a table and writes bench-results.json.
bench: $(STAMP)
	$(PY) -m bench --json bench-results.json

test: apt-deps $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check displback tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
