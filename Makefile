# homepbx: the two set-up commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
# Debian's python3.11 first: the interpreter the disk image ships, built with PGO and LTO.
# A pyenv build earlier on PATH is not, and runs the edge's call path a third slower.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(wildcard /usr/bin/python3.11) $(shell command -v python3.11 || command -v python3))
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The venv is made again when the interpreter changes (PYTHON=..., or a venv made before
# Debian's came first).
PYTHON_STAMP := $(VENV)/.python$(subst /,-,$(PYTHON))
CONFIG ?= config.toml
# Debian packages the PBX and its tests need (python3-venv for the venv, python3-dev and gcc
# for the modules mypyc compiles, sip-tester (SIPp), baresip-core, linphone-cli, sipsak and kamailio (a stand-in provider), SIP software
# we did not write, iproute2 (the box's addresses, network namespaces for the LAN audio test), tmux for the
# terminal test of the TUI, procps for process checks; systemd, shellcheck,
# dosfstools, mtools, fdisk and e2fsprogs for the checks of the systemd units and of the disk image recipe;
# mmdebstrap, qemu, OVMF, sshpass and ssh to build the disk image and boot it in the test;
# qemu-user-static (the arm64 image's chroot), qemu-system-arm and qemu-efi-aarch64 (AAVMF) to
# build the arm64 image and boot it;
# espeak-ng renders the answering machine's spoken prompts, `make prompts`;
# g++, make, patch, swig, libssl-dev, libsrtp2-dev and libsamplerate0-dev build our pjsua2, `make pjsua2`).
DEB_PACKAGES := python3 python3-venv python3-dev gcc sip-tester baresip-core linphone-cli sipsak kamailio iproute2 tmux procps systemd shellcheck dosfstools mtools fdisk e2fsprogs espeak-ng \
	mmdebstrap qemu-system-x86 qemu-utils ovmf sshpass openssh-client \
	qemu-user-static qemu-system-arm qemu-efi-aarch64 \
	g++ make patch swig libssl-dev libsrtp2-dev libsamplerate0-dev

# HOMEPBX_NATIVE=0 (environment or command line): plain Python, nothing compiled.
HOMEPBX_NATIVE ?= 1
NATIVE := $(VENV)/.native-$(HOMEPBX_NATIVE)
# Every module of the daemon: mypyc also bakes constants of the modules it imports into
# the compiled code.
NATIVE_SOURCES := setup.py $(shell find appliance -name '*.py')

.PHONY: run demo test lint unit e2e bench deps venv native clean-native clean prompts pjsua2

# The answering machine's spoken prompts, WAV files rendered by espeak-ng from the texts in
# appliance/media/render_prompts.py (gitignored; a missing prompt is played as a tone).
PROMPTS_STAMP := appliance/media/prompts/.rendered
prompts: $(PROMPTS_STAMP)

$(PROMPTS_STAMP): appliance/media/render_prompts.py | deps
	$(PYTHON) -m appliance.media.render_prompts appliance/media/prompts
	touch $@

# The daemon on the shipped config with the TUI attached (daemon log: state/daemon.log);
# quitting the TUI stops the daemon. Without a terminal it runs the daemon alone, in the foreground.
run: venv prompts
	$(BIN)/homepbx run --tui --config $(CONFIG)

# A daemon on a temporary config, four simulated handsets and calls, with the TUI.
demo: venv prompts
	$(BIN)/homepbx demo

# pytest in two processes (pytest-xdist), each file's tests on one of them, the files in the
# order tests/conftest.py gives them (the disk images first: the arm64 one on one worker,
# then the heavy files; the amd64 one on the other, then the rest);
# PARALLEL= on the command line runs in one process.
PARALLEL ?= -n 2 --dist loadgroup --no-loadscope-reorder

# The whole suite, the two disk images' builds and their boots in QEMU included (amd64 and
# arm64, the arm64 one with our pjsua2 cross-compiled: `make deps-arm64` installs its
# toolchain; image/README.md). HOMEPBX_IMAGE_TEST=0 leaves both images out,
# HOMEPBX_IMAGE_TEST_ARM64=0 the arm64 one.
HOMEPBX_IMAGE_TEST ?= 1
HOMEPBX_IMAGE_TEST_ARM64 ?= $(HOMEPBX_IMAGE_TEST)
test: venv lint prompts $(if $(filter 1,$(HOMEPBX_IMAGE_TEST_ARM64)),deps-arm64)
	HOMEPBX_IMAGE_TEST=$(HOMEPBX_IMAGE_TEST) HOMEPBX_IMAGE_TEST_ARM64=$(HOMEPBX_IMAGE_TEST_ARM64) \
	  $(BIN)/python -m pytest -q $(PARALLEL)

lint: venv
	$(BIN)/ruff check appliance tui tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: venv
	$(BIN)/python -m pytest -q $(PARALLEL) tests/unit

e2e: venv prompts
	$(BIN)/python -m pytest -q $(PARALLEL) tests/e2e

bench: venv
	$(BIN)/python bench/parse.py
	$(BIN)/python bench/register.py
	$(BIN)/python bench/calls.py
	$(BIN)/python bench/media.py
	$(BIN)/python bench/tui.py
	$(BIN)/python bench/fuzz.py --seconds 60
	$(BIN)/python bench/soak.py --minutes 2
	$(BIN)/python bench/tcp_attack.py
	$(BIN)/python bench/crash.py
	$(BIN)/python bench/trunk.py
	$(BIN)/python bench/lamps.py
	$(BIN)/python bench/media_vs_asterisk.py
	$(BIN)/python bench/cpu_by_process.py
	$(BIN)/python bench/history.py

# The appliance's disk image, build/image/homepbx-<version>-$(ARCH).img (as root; image/README.md):
# `make image` for x86-64 PCs, `make image ARCH=arm64` for UEFI arm64 boards and the Raspberry Pi 4.
ARCH ?= amd64
.PHONY: image
image: venv prompts $(if $(filter arm64 aarch64,$(ARCH)),deps-arm64)
	$$([ "$$(id -u)" = 0 ] || echo sudo) image/build.sh --arch $(ARCH)

# The cross toolchain and arm64 libraries our pjsua2 is cross-compiled with for the arm64
# image (image/pjsua2/build.sh, ARCH=arm64); `make image ARCH=arm64` installs them.
DEB_PACKAGES_ARM64 := crossbuild-essential-arm64 libssl-dev:arm64 libsrtp2-1:arm64 libsamplerate0-dev:arm64 \
	libpython3.11-dev:arm64
.PHONY: deps-arm64
deps-arm64: deps
	@SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	dpkg --print-foreign-architectures | grep -qx arm64 || { $$SUDO dpkg --add-architecture arm64 && $$SUDO apt-get update -qq; }; \
	missing=$$(for p in $(DEB_PACKAGES_ARM64); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# Installs missing Debian packages (as root, or through sudo) on a fresh machine.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# pjsua2, PJSIP's Python bindings: our own wheel, built by image/pjsua2/build.sh from the
# pjproject tarball of Debian's asterisk source package (pinned by sha256) against Debian's
# OpenSSL 3, with our limits (image/pjsua2/config_site.h). A cold build takes about 1.5
# minutes on two cores; the wheel is cached in ~/.cache/homepbx/pjsua2 under the hash of the
# script, config_site.h and the pin (the key), so it is built again only when one of them
# changes, and once for every checkout of the same inputs. The stamp carries the key.
PJSUA2_ARCH := $(shell dpkg --print-architecture)
PJSUA2_KEY := $(shell ARCH=$(PJSUA2_ARCH) image/pjsua2/build.sh --key)
PJSUA2_DIR := build/pjsua2/$(PJSUA2_ARCH)
PJSUA2_STAMP := build/pjsua2/.built-$(PJSUA2_ARCH)-$(PJSUA2_KEY)
PJSUA2_INSTALLED := $(VENV)/.pjsua2-$(PJSUA2_KEY)
pjsua2: $(PJSUA2_STAMP)

$(PJSUA2_STAMP): image/pjsua2/build.sh image/pjsua2/config_site.h image/pjsua2/mkwheel.py $(wildcard image/pjsua2/patches/*.patch) | deps
	ARCH=$(PJSUA2_ARCH) image/pjsua2/build.sh
	rm -f build/pjsua2/.built-$(PJSUA2_ARCH)-*
	touch $@

venv: $(STAMP) $(PJSUA2_INSTALLED) $(NATIVE)

$(PYTHON_STAMP):
	rm -rf $(VENV)
	mkdir -p $(VENV)
	touch $@

# pyproject.toml pins our wheel (homepbx-pjsua2): pip finds it in $(PJSUA2_DIR).
$(STAMP): pyproject.toml $(PYTHON_STAMP) | deps $(PJSUA2_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	HOMEPBX_NATIVE=0 $(BIN)/pip install -q --find-links $(PJSUA2_DIR) -e '.[test,bench]'
	touch $(STAMP)

# A rebuilt wheel replaces the installed one, even under the same version.
$(PJSUA2_INSTALLED): $(PJSUA2_STAMP) | $(STAMP)
	$(BIN)/pip install -q --no-deps --force-reinstall $(PJSUA2_DIR)/homepbx_pjsua2-*.whl
	rm -f $(VENV)/.pjsua2-*
	touch $@

# The SIP core and the edge's hot path compiled in place with mypyc (setup.py), again
# whenever a module of the daemon changes (about two minutes of one core). The old build
# is removed first, so a failed build leaves plain Python and stops make, never stale code.
native: $(NATIVE)

$(NATIVE): $(STAMP) $(NATIVE_SOURCES)
	rm -f $(VENV)/.native-*
	find appliance -name '*.so' -delete
ifeq ($(HOMEPBX_NATIVE),0)
	@echo "HOMEPBX_NATIVE=0: plain Python, nothing compiled"
else
	set -o pipefail; $(BIN)/python setup.py -q build_ext --inplace 2>&1 | { grep -v -e '^gcc ' -e '^copying ' \
	  -e '^creating ' -e '^building ' -e 'generator comprehension' -e 'BetaConfiguration' -e 'warnings.warn' || true; }
	$(BIN)/python -c 'import appliance.sip.message as m, sys; sys.exit(not m.__file__.endswith(".so"))' \
	  || { echo "mypyc build failed: appliance.sip.message is not the compiled module" >&2; exit 1; }
	find appliance -name '*.so' -exec touch {} +  # stamped as built now (tests/conftest.py checks)
endif
	touch $@

clean-native:
	rm -rf build/mypyc build/temp.* build/lib.* $(VENV)/.native-*
	find appliance -name '*.so' -delete

clean: clean-native
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache
