# Keyway — the two commands are `make demo` and `make test`.
# Both install what they need (Debian packages via apt-get, nothing else assumed).

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: demo test bench crds lint fmt deps build clean-demo chart-test manifests dashboard-pictures

## demo: build, start the operator on a copy of examples/local, show allocations and a live snapshot subscriber
demo: deps build
	@bash scripts/demo.sh

## test: every test — unit, property, CRD drift, lint, and end-to-end with the real binaries
test: deps
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked --no-fail-fast
	$(MAKE) chart-test
	$(MAKE) lint

## chart-test: the Helm chart, manifests/ and the examples with the real Helm library
## (helm-sdkpy), kubernetes-validate, HAProxy and openssl (Python venv under target/)
chart-test: deps
	@bash scripts/chart-test.sh

## manifests: re-render manifests/install.yaml (and the chart's copies of crds/ and alerts)
manifests:
	@bash scripts/render-manifests.sh

## dashboard-pictures: docs/dashboards/*.png, each dashboard drawn from a real Prometheus's data
dashboard-pictures: deps
	@bash scripts/dashboard-pictures.sh

## bench: the benchmarks, written to BENCHMARKS.md
bench: deps
	@bash scripts/bench.sh

## crds: regenerate crds/*.yaml from the Rust types
crds:
	$(CARGO) run --quiet -p keyway-operator --bin keyway-operator -- crdgen --out crds

## lint: rustfmt and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --workspace --bins --locked

## deps: Debian packages the demo and tests drive (idempotent)
deps:
	@bash scripts/install-deps.sh
