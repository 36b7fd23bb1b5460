# vtpmd: build, demo and test entry points. Every target installs what it
# needs first (Debian packages via scripts/install-deps.sh).

CARGO ?= cargo
VTPMD := $(CURDIR)/target/release/vtpmd

.PHONY: all deps build demo test lint unit-and-integration kernel-tests bench bench-smoke clean fuzz fuzz-deps fuzz-replay

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
# Then QEMU 11.1 (from a Debian sid root under build/): the virtio-tpm guest
# on `vtpmd vhost-user` with our guest driver, crb/tis, and migration again.
kernel-tests: build
	TPM_BACKEND_BIN=$(VTPMD) bash kernel-tests/run-tests.sh
	TPM_BACKEND_BIN=$(VTPMD) python3 kernel-tests/migration-test.py
	TPM_BACKEND_BIN=$(VTPMD) bash kernel-tests/run-qemu11-tests.sh

# vtpmd vs swtpm 0.7.1 (the system's) and swtpm 0.10 (Debian sid, from a
# root under build/swtpm-sid made once) vs in-process libtpms, side by side
# (not a timed test).
bench: build
	bash bench/prepare-swtpm-sid.sh
	./target/release/vtpm-bench

# A few iterations of every benchmark row, so the harness cannot rot (sid's
# swtpm only if its root is already there).
bench-smoke: build
	./target/release/vtpm-bench --smoke

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

test: deps lint unit-and-integration fuzz-replay bench-smoke kernel-tests

clean:
	$(CARGO) clean
	rm -rf build
