# vtpmd: build, demo and test entry points. Every target installs what it
# needs first (Debian packages via scripts/install-deps.sh).

CARGO ?= cargo
VTPMD := $(CURDIR)/target/release/vtpmd

.PHONY: all deps build demo test lint unit-and-integration kernel-tests bench bench-smoke clean fuzz fuzz-deps fuzz-replay install uninstall install-test

all: build

deps:
	bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace

# Boot a small Linux guest with a vTPM served by vtpmd and show tpm2-tools
# working inside it.
demo: build
	TPM_BACKEND_BIN=$(VTPMD) bash kernel-tests/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	python3 scripts/check-layers.py

# Unit tests, host integration tests (real sockets, real libtpms, tpm2-tools
# against vtpmd and swtpm side by side).
unit-and-integration: build
	$(CARGO) test --release --workspace

# Real guests: Debian kernel + busybox/tpm2-tools initramfs under QEMU TCG,
# tpm-crb and tpm-tis, two boots each on one state directory; then sealed
# live migration, save-to-file secrecy against swtpm, and the attack matrix.
# Then QEMU 10.0 (from bookworm-backports, unpacked under build/): crb/tis
# and the sealed and plain live migrations. Then libvirt 9.0:
# libvirt-test.py (libvirtd started by the test in a private namespace, the
# system instance): the external backend as the README has it, and libvirt's
# emulator backend running vtpm-setup, vtpmd and vtpmctl (plain, PCR banks,
# encrypted, switching from and back to swtpm), and virsh save/restore,
# managedsave and an internal memory snapshot with vtpmd sealing the TPM to
# the host (refusals: another host key, a flipped byte, a refused rollback);
# libvirt-migrate-test.py (two libvirt hosts in namespaces of their own
# joined by a veth pair: virsh migrate with swtpm as the baseline, then
# `vtpmctl migrate` with vtpmd, stream captured and replayed).
# Then QEMU 11.1 (from a Debian sid root under build/): the virtio-tpm guest
# on `vtpmd vhost-user` with our guest driver, crb/tis, and migration again.
# The host-side tests' vtpmd processes use a host key under build/ rather
# than the machine's /var/lib/vtpm-hostkey (libvirt's run in their own namespace).
TEST_KEYS := VTPM_HOST_KEY_DIR=$(CURDIR)/build/test-host-key
kernel-tests: build
	$(TEST_KEYS) ./target/release/vtpmctl keygen --system >/dev/null
	$(TEST_KEYS) TPM_BACKEND_BIN=$(VTPMD) bash kernel-tests/run-tests.sh
	$(TEST_KEYS) TPM_BACKEND_BIN=$(VTPMD) python3 kernel-tests/migration-test.py
	$(TEST_KEYS) TPM_BACKEND_BIN=$(VTPMD) bash kernel-tests/run-qemu10-tests.sh
	python3 kernel-tests/libvirt-test.py
	python3 kernel-tests/libvirt-migrate-test.py
	$(TEST_KEYS) TPM_BACKEND_BIN=$(VTPMD) bash kernel-tests/run-qemu11-tests.sh

# vtpmd vs swtpm 0.7.1 (the system's) and swtpm 0.10 (Debian sid, from a
# root under build/swtpm-sid made once) vs in-process libtpms, side by side
# (not a timed test).
bench: build
	bash bench/prepare-swtpm-sid.sh
	$(TEST_KEYS) ./target/release/vtpmctl keygen --system >/dev/null
	$(TEST_KEYS) ./target/release/vtpm-bench

# A few iterations of every benchmark row, so the harness cannot rot (sid's
# swtpm only if its root is already there).
bench-smoke: build
	$(TEST_KEYS) ./target/release/vtpmctl keygen --system >/dev/null
	$(TEST_KEYS) ./target/release/vtpm-bench --smoke

# Every kept fuzz input (fuzz/corpus, fuzz/regressions) through the fuzz
# targets' bodies, on stable Rust: no fuzzer needed (docs/FUZZING.md).
fuzz-replay: deps
	$(CARGO) test --release -p vtpm-fuzz --test replay

# Coverage-guided fuzzing with libFuzzer (cargo-fuzz on the stable toolchain
# with RUSTC_BOOTSTRAP=1): every target for FUZZ_SECONDS, one at a time.
# Not part of `make test`. FUZZ_TARGETS="a b" runs only those.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?=
fuzz-deps: deps
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked --version 0.13.2

fuzz: fuzz-deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh $(FUZZ_TARGETS)

# Installation (PREFIX, DESTDIR as usual). `make build` first: install only
# copies. Binaries to BINDIR, man pages, the vtpmd@.service template, and
# the libvirt opt-in: vtpm-libvirt plus a directory of links named swtpm,
# swtpm_setup and swtpm_ioctl (relative links, so a DESTDIR tree works).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
MANDIR ?= $(PREFIX)/share/man
SYSTEMD_UNIT_DIR ?= $(LIBDIR)/systemd/system
SWTPM_LINKDIR ?= $(LIBDIR)/vtpmd/swtpm
RELEASE := target/release
INSTALL_BINS := vtpmd vtpmctl vtpm-setup
MAN8 := vtpmd vtpmctl vtpm-setup vtpm-libvirt
# name in the link directory -> the binary it leads to
SWTPM_LINKS := swtpm:vtpmd swtpm_setup:vtpm-setup swtpm_ioctl:vtpmctl

install:
	@for b in $(INSTALL_BINS); do [ -x $(RELEASE)/$$b ] || { echo "install: $(RELEASE)/$$b is missing: run 'make build' first" >&2; exit 1; }; done
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(SYSTEMD_UNIT_DIR) $(DESTDIR)$(SWTPM_LINKDIR)
	install -m 0755 $(addprefix $(RELEASE)/,$(INSTALL_BINS)) $(DESTDIR)$(BINDIR)/
	sed 's|@SWTPM_LINKDIR@|$(SWTPM_LINKDIR)|g; s|@BINDIR@|$(BINDIR)|g' packaging/vtpm-libvirt.in > $(DESTDIR)$(BINDIR)/.vtpm-libvirt.tmp
	chmod 0755 $(DESTDIR)$(BINDIR)/.vtpm-libvirt.tmp
	mv -f $(DESTDIR)$(BINDIR)/.vtpm-libvirt.tmp $(DESTDIR)$(BINDIR)/vtpm-libvirt
	install -m 0644 $(addprefix docs/man/,$(addsuffix .8,$(MAN8))) $(DESTDIR)$(MANDIR)/man8/
	sed 's|@BINDIR@|$(BINDIR)|g' packaging/vtpmd@.service.in > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/.vtpmd@.service.tmp
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/.vtpmd@.service.tmp
	mv -f $(DESTDIR)$(SYSTEMD_UNIT_DIR)/.vtpmd@.service.tmp $(DESTDIR)$(SYSTEMD_UNIT_DIR)/vtpmd@.service
	@rel=$$(realpath -m --relative-to=$(SWTPM_LINKDIR) $(BINDIR)); \
	for l in $(SWTPM_LINKS); do \
	  echo "ln -sfn $$rel/$${l#*:} $(DESTDIR)$(SWTPM_LINKDIR)/$${l%%:*}"; \
	  ln -sfn "$$rel/$${l#*:}" "$(DESTDIR)$(SWTPM_LINKDIR)/$${l%%:*}" || exit 1; \
	done

# Removes what `install` put there (all names, whichever were installed).
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -x $(BINDIR)/vtpm-libvirt ] && $(BINDIR)/vtpm-libvirt status | grep -q ': enabled'; then \
	  echo "uninstall: libvirt is still opted in to vtpmd: run 'vtpm-libvirt disable' first" >&2; exit 1; fi
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,vtpmd vtpmctl vtpm-setup vtpm-libvirt)
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man8/,vtpmd.8 vtpmctl.8 vtpm-setup.8 vtpm-libvirt.8)
	rm -f $(DESTDIR)$(SYSTEMD_UNIT_DIR)/vtpmd@.service
	rm -f $(addprefix $(DESTDIR)$(SWTPM_LINKDIR)/,swtpm swtpm_setup swtpm_ioctl)
	-rmdir $(DESTDIR)$(SWTPM_LINKDIR) $(DESTDIR)$(LIBDIR)/vtpmd 2>/dev/null

# `make install` into a scratch DESTDIR: the expected files, links that
# resolve, man pages that render without warnings and document every
# option --help lists, `make uninstall` leaving nothing.
install-test: build
	bash scripts/install-test.sh

test: deps lint unit-and-integration fuzz-replay bench-smoke install-test kernel-tests

clean:
	$(CARGO) clean
	rm -rf build
