# One task runner for people and CI. `make run` and `make test` are the two commands.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
# cargo-nextest prints one summary for the whole suite; plain cargo test works too.
TEST_RUNNER := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo "nextest run --no-fail-fast" || echo "test --no-fail-fast")

.PHONY: help setup build filter control-plane run test lint unit e2e bench fmt clean install uninstall image

help:
	@echo "make run    build and start control plane + Envoy + a demo target on the defaults"
	@echo "make test   everything: fmt check, clippy, unit, integration and end-to-end tests"
	@echo "make build  target/release/knocker and target/wasm/knocker_filter.wasm"
	@echo "make bench  benchmarks; results in docs/benchmarks.md"
	@echo "make install  put knocker in $(PREFIX)/bin (PREFIX=~/.local for your own)"
	@echo "make image  the control plane's image contents and the filter's OCI image (no engine needed)"

setup:
	@scripts/setup.sh

control-plane:
	$(CARGO) build --release -p knocker

filter: setup
	@scripts/build-filter.sh

build: setup control-plane filter

run: build
	@scripts/run.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings

# The images' contents, built without a container engine (Dockerfile and
# deploy/filter.Dockerfile do the same with one).
image: build
	@scripts/image.sh

# Unit, service and end-to-end tests in one run (the e2e tests start the binaries that
# `build` made, the real Envoy and real targets, and what `image` made). The test build
# first, on its own: it fails when it compiled the control plane a second time
# (scripts/build-tests.sh).
# Then the end-to-end suite again on the oldest Envoy the docs promise (the sessions
# of `make run`, which start their own Envoy, left out). With nextest it is picked from
# the workspace's build by a filter, not built again with `-p` (whose features differ:
# a second compile of most dependencies); nextest counts the tests left out as skipped.
OLDEST_ENVOY := .tools/envoy-1.36.4/bin/envoy
OLDEST_ENVOY_TESTS := $(shell $(CARGO) nextest --version >/dev/null 2>&1 \
	&& echo "--workspace -E 'package(knocker-e2e) & not (test(readme::) | test(make_run::))'" \
	|| echo "-p knocker-e2e")
# Last, the tests that start a NATS server (the engine's own, the store contract on every
# engine, the cluster and NATS login tests, the guide's NATS session) again on the newer
# server the manifests in deploy/ run, first on PATH (scripts/setup.sh installs it).
NEWEST_NATS := .tools/nats-server-2.12.8
NATS_TESTS := $(shell $(CARGO) nextest --version >/dev/null 2>&1 \
	&& echo "--workspace -E 'test(/nats/) | test(/contract_tests/) | test(/^cluster::/)'" \
	|| echo "--workspace -- nats contract_tests cluster::")
test: build image lint
	@CARGO=$(CARGO) scripts/build-tests.sh
	$(CARGO) $(TEST_RUNNER) --release --workspace
	@echo "== the end-to-end suite on Envoy $$($(OLDEST_ENVOY) --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1) (the other tests ran above)"
	ENVOY_BIN=$(CURDIR)/$(OLDEST_ENVOY) $(CARGO) $(TEST_RUNNER) --release $(OLDEST_ENVOY_TESTS)
	@echo "== the NATS tests on nats-server $$($(NEWEST_NATS)/nats-server --version | grep -o '[0-9.]*$$') (on $$(nats-server --version | grep -o '[0-9.]*$$') above)"
	PATH=$(CURDIR)/$(NEWEST_NATS):$$PATH $(CARGO) $(TEST_RUNNER) --release $(NATS_TESTS)

bench: build
	@scripts/bench.sh

# `knocker` on PATH: the CLI (jobs, monitors, targets, …) and the control plane.
PREFIX ?= /usr/local
install: control-plane
	install -D -s -m 0755 target/release/knocker $(DESTDIR)$(PREFIX)/bin/knocker
	@echo "installed $(DESTDIR)$(PREFIX)/bin/knocker"

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/knocker

clean:
	$(CARGO) clean
