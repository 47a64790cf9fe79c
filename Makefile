# The README's commands. Everything a fresh Debian 12 machine needs is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VM_APT_PACKAGES := qemu-system-x86 xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils \
	linux-source-6.1 busybox-static cpio build-essential bc bison flex libelf-dev libssl-dev \
	dwarves libdrm-dev linux-libc-dev xz-utils kmod
# `make test-vm-arm64`: QEMU for Arm and the cross compiler (Xen, xen-utils and Python for the
# arm64 Dom0 are Debian arm64 packages fetched and unpacked by tests/vm/arm64_root.py).
VM_ARM64_APT_PACKAGES := qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
	linux-source-6.1 busybox-static cpio bc bison flex libssl-dev libdrm-dev xz-utils \
	dpkg-dev
# python3-dev: the headers of displback.backend._copythreads (setup.py), so that the tests run
# the native copy threads. Not among INSTALL_APT_PACKAGES: a Dom0 without a compiler or the
# headers installs without the extension and copies in Python threads (the same daemon).
APT_PACKAGES := gcc libc6-dev linux-libc-dev libatomic1 libxen-dev libdrm-dev xenstore-utils strace \
	edid-decode cpio python3-venv python3-dev systemd weston
# `make displ-be` (bench/displ_be.py): the reference C++ backend, built into ~/.cache/displback.
DISPL_BE_APT_PACKAGES := git cmake g++ make pkg-config libxen-dev libdrm-dev libudev-dev
# `make install` (docs/operations.md): Debian's interpreter and its venv module.
INSTALL_APT_PACKAGES := python3 python3-venv libatomic1
# Wheels of displback's dependencies and build backend: `make install WHEELHOUSE=...` installs
# from them without PyPI (an air-gapped Dom0; tests/test_install.py).
WHEELHOUSE_DIR ?= $(VENV)/wheelhouse
# Paths `make install`/`make uninstall` take from the command line (packaging/install.sh).
INSTALL_VARS := DESTDIR PREFIX BINDIR DOCDIR VENVDIR SYSCONFDIR UNITDIR INSTALL_PYTHON \
	WHEELHOUSE PIP_ARGS
INSTALL_ENV = $(foreach v,$(INSTALL_VARS),$(if $(filter undefined,$(origin $v)),,$v='$($v)'))

.PHONY: test test-vm test-vm-pvh test-vm-arm64 demo bench soak fuzz mutate lint apt-deps \
	vm-deps clean install uninstall install-deps wheelhouse deb bench-vm displ-be

# setup.py and the C source: an editable install builds the extension into the tree, and only
# a new install rebuilds it.
$(STAMP): pyproject.toml setup.py displback/backend/_copythreads.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,wayland]'
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

# displback against the reference backend displ_be in the nested Xen VM (issue 12 goal 0;
# docs/benchmarks.md): one boot, the same guest flipping on each backend; table + JSON.
# DISPL_BE=<prefix of a displ_be build> adds displ_be (`make displ-be` builds one and prints it).
# STACKS=1 adds a window of each displback backend sampled by py-spy (installed in the venv).
bench-vm: apt-deps vm-deps $(STAMP)
	$(PY) -m tests.vm.kernel
	$(if $(STACKS),$(PY) -m pip install --quiet 'py-spy>=0.4')
	$(PY) -m bench.vm --json bench-vm-results.json $(if $(DISPL_BE),--displ-be '$(DISPL_BE)') \
		$(if $(STACKS),--stacks)

displ-be: $(STAMP)
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(DISPL_BE_APT_PACKAGES)"
	@$(PY) -m bench.displ_be

# Issue 12 goal 6, not part of make test: 16 guests flip 2 connectors each (copy mode) for
# SOAK_SECONDS while the daemon's RSS is sampled; growth after the warm-up is judged
# (docs/benchmarks.md). Writes soak-results.json.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PY) -m bench.memory --soak $(SOAK_SECONDS) --json soak-results.json

# DISPLBACK_REQUIRE_NATIVE: the native copy threads must have been built (gcc, python3-dev):
# without it their tests would be skipped and every copy would run in Python threads.
test: apt-deps $(STAMP) wheelhouse
	DISPLBACK_REQUIRE_NATIVE=1 $(PY) -m pytest -q

# Stateful fuzzing of the daemon by a hostile guest beside an honest one (tests/hostile/
# test_fuzz.py): make test runs 12 reproducible examples, this FUZZ_EXAMPLES random ones and
# prints examples, steps and invariant checks at the end.
FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	DISPLBACK_FUZZ=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/hostile/test_fuzz.py

# Mutation testing (docs/testing.md): mutmut over displback/protocol and displback/backend,
# each group of modules against its own fast test files; prints the survivors and a score.
# Not part of `make test` (protocol ~15 min on 2 cores; the backend groups take hours).
# MUTATE="protocol backend-units" picks groups (`python -m tests.mutation --list`).
MUTATE ?=
mutate: $(STAMP)
	$(PY) -m tests.mutation $(MUTATE)

# The daemon for a Debian 12 Dom0: a venv in /opt/displback, /usr/bin/displback, the unit in
# /etc/systemd/system, /etc/displback/displback.toml (an edited one is kept), the docs in
# /usr/share/doc/displback. No prompts; DESTDIR=/stage and the paths above move it.
install: install-deps
	$(INSTALL_ENV) sh packaging/install.sh install

uninstall:
	$(INSTALL_ENV) sh packaging/install.sh uninstall

# The same tree as a Debian package: build/displback_VERSION_ARCH.deb (packaging/deb.sh).
deb: install-deps
	rm -rf build/deb
	@$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/build/deb/root \
		UNITDIR=/lib/systemd/system
	sh packaging/deb.sh build/deb/root build

install-deps:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(INSTALL_APT_PACKAGES)"

wheelhouse: $(WHEELHOUSE_DIR)/.complete

$(WHEELHOUSE_DIR)/.complete: $(STAMP)
	$(PY) -m pip wheel --quiet -w $(WHEELHOUSE_DIR) . 'setuptools>=77'
	touch $@

# The nested-Xen VM tests (docs/testing.md): Xen 4.17 under QEMU TCG, a Dom0 running our
# daemon, guests running Linux's xen-drm-front. The first run builds the kernel (~15 min,
# cached in ~/.cache/displback).
vm-deps:
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(VM_APT_PACKAGES)"

# The wheelhouse: the systemd scenarios install displback by `make install` from it, offline.
test-vm: apt-deps vm-deps $(STAMP) wheelhouse
	$(PY) -m tests.vm.kernel
	$(PY) -m pytest -m "vm and not pvh_dom0 and not arm64" tests/vm -v -s

# A PVH Dom0 (behind QEMU's emulated AMD IOMMU): boots, but unstable under TCG.
test-vm-pvh: apt-deps vm-deps $(STAMP)
	$(PY) -m tests.vm.kernel
	$(PY) -m pytest -m "vm and pvh_dom0" tests/vm -v -s

# Xen on arm64 under QEMU (virt, TCG), where guest-allocated zero-copy works (issue 15): an
# arm64 kernel cross-built from linux-source-6.1, a Dom0 root from Debian's arm64 packages
# (both cached in ~/.cache/displback). Not part of .ci/run (docs/testing.md says why).
test-vm-arm64: apt-deps $(STAMP)
	@$(MAKE) --no-print-directory apt-deps APT_PACKAGES="$(VM_ARM64_APT_PACKAGES)"
	$(PY) -m tests.vm.kernel --arch arm64
	$(PY) -m tests.vm.arm64_root
	$(PY) -m pytest -m "vm and arm64" tests/vm -v -s

lint: $(STAMP)
	$(VENV)/bin/ruff check displback tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info displback/backend/*.so
