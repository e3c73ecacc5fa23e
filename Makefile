# mtunnel — make demo | make test | make bench | make header | make deb
SHELL   := /bin/bash
CARGO   ?= cargo
PROVE   ?= prove
LIB     := target/release/libmtunnel.so
PERL5   := -Iperl/lib -It/lib

.PHONY: all setup tidy tidy-check build header header-check examples check test test-rust test-c test-perl test-upstream test-series test-deb deb demo bench lab-down clean fuzz

all: build

# Debian packages the lab, the tests and the demo need (idempotent; skips apt when present).
setup:
	@lab/setup-packages

build: setup
	$(CARGO) build --release --locked
	@# the library's soname is libmtunnel.so.0: programs linked in the tree (examples/c) load that name
	ln -sfn libmtunnel.so target/release/libmtunnel.so.0
	$(MAKE) -C examples/c

# The Perl sources through perltidy with .perltidyrc: tidy rewrites, tidy-check only checks.
tidy: setup
	lab/perl-tidy

tidy-check: setup
	lab/perl-tidy --check

# Regenerates the committed C header from src/ffi/.
header:
	MTUNNEL_WRITE_HEADER=1 $(CARGO) build --release --locked

examples: build

# The quick loop (a few minutes at most): cargo's tests, the C example's argument checks and
# every prove test that needs no lab (those that do not use t/lib/MTunnelLab.pm or
# UpstreamLab.pm). `make test` stays the full suite; CI runs that.
NOLAB_TESTS = $(shell grep -L -e MTunnelLab -e UpstreamLab t/*.t)

check: build
	@$(MAKE) --no-print-directory test-rust test-c
	MTUNNEL_LIB=$(CURDIR)/$(LIB) lab/reap-run $(PROVE) $(PERL5) $(NOLAB_TESTS)
	@echo "make check: passed (the lab tests run with make test)"

test: build
	@$(MAKE) --no-print-directory test-rust test-c test-perl test-upstream test-deb
	@if [ -f target/test-upstream.skipped ]; then \
	    echo "make test: all run tests passed; NOT run: $$(cat target/test-upstream.skipped)"; \
	else echo "make test: all passed"; fi

test-rust:
	$(CARGO) test --release --locked

test-c:
	@echo "== C example: argument checks (no lab) =="
	examples/c/build/errors

# reap-run: the lab's daemons are reaped by us, as systemd would on a PVE host. prove-lanes:
# the tests that do not measure run two at a time, the others alone (lab/prove-lanes).
test-perl:
	MTUNNEL_LIB=$(CURDIR)/$(LIB) lab/reap-run lab/prove-lanes $(PERL5)

# Upstream's migration suite on qemu-server with the series, and the lab harness running
# upstream's QemuMigrate.pm (needs QEMU_SERVER_SRC and the other trees, or PVE_SRC: README,
# "Upstream sources"; without them one line says what was not run). test-series: the suite
# after each patch of the series, one after the other.
test-upstream:
	@MTUNNEL_LIB=$(CURDIR)/$(LIB) lab/reap-run lab/upstream/check

test-series:
	lab/upstream/suite --each

# Debian packages (libmtunnel0, libmtunnel-dev, libpve-mtunnel-perl) into target/deb/, built by
# dpkg-buildpackage + debhelper in a copy of the tree's files (dpkg-buildpackage writes to the
# parent directory: target/deb/, not the checkout's parent). The copy's cargo build reuses
# target/ (CARGO_TARGET_DIR), offline. lintian must report no errors. Rebuilt only when a
# tracked file is newer than the last build.
VERSION   := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
DEB_DIR   := target/deb
DEB_SRC   := $(DEB_DIR)/mtunnel-$(VERSION)
DEB_STAMP := $(DEB_DIR)/built-$(VERSION)
DEB_ARCH   = $(shell dpkg --print-architecture)
TRACKED   := $(wildcard $(shell git ls-files 2>/dev/null))

deb: $(DEB_STAMP)

$(DEB_STAMP): $(TRACKED) | build
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C $(DEB_SRC) -xf -
	cd $(DEB_SRC) && CARGO_TARGET_DIR=$(CURDIR)/target dpkg-buildpackage -b -us -uc
	lintian --fail-on error --info $(DEB_DIR)/mtunnel_$(VERSION)_$(DEB_ARCH).changes
	@ls -l $(DEB_DIR)/*.deb
	touch $@

# Installs the packages on this machine (purged again on every path, under a lock), runs the
# binding and tunnel tests against the installed modules and library (no -Iperl/lib, no
# MTUNNEL_LIB, run from outside the tree), and builds a C example with pkg-config only.
test-deb: deb
	@lab/test-deb $(DEB_DIR) $(VERSION)

demo: build
	@MTUNNEL_LIB=$(CURDIR)/$(LIB) lab/reap-run lab/demo.sh

bench: build
	@MTUNNEL_LIB=$(CURDIR)/$(LIB) lab/reap-run lab/bench.sh

lab-down:
	lab/lab.sh down

clean:
	$(CARGO) clean
	$(MAKE) -C examples/c clean

# Fuzzing (nightly + cargo-fuzz): each target runs FUZZ_SECONDS (make fuzz FUZZ_SECONDS=300).
# The committed corpus fuzz/corpus/T is read; new inputs go to fuzz/target/corpus/T and crash
# inputs to fuzz/artifacts/T (both gitignored). `cargo test` replays the committed corpus
# (tests/fuzz_corpus.rs); see fuzz/checks.rs for what each target checks.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := qmp_stream query_migrate tunnel_lines listen_lines validation

fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	@failed=; for t in $(FUZZ_TARGETS); do \
	  log=fuzz/target/fuzz-$$t.log; mkdir -p fuzz/target/corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s (log: $$log)"; \
	  if cargo +nightly fuzz run $$t $(CURDIR)/fuzz/target/corpus/$$t $(CURDIR)/fuzz/corpus/$$t -- \
	       -max_total_time=$(FUZZ_SECONDS) >$$log 2>&1; then \
	    grep -E '^Done' $$log; \
	  else \
	    tail -n 40 $$log; failed="$$failed $$t"; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "make fuzz: FAILED:$$failed (crash inputs in fuzz/artifacts/)"; exit 1; fi; \
	echo "make fuzz: no findings"
