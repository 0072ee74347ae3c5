# txnflow: the two commands are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
TXNFLOW := target/debug/txnflow
# cargo-nextest, as `make up` installs it when the machine has none.
export PATH := $(CURDIR)/.stack/tools/bin:$(PATH)

.PHONY: help up down status run test test-unit test-airflow chaos fuzz bench-ml-api bench-pipeline bench-batch bench-history bench-tracing bench-schemas bench-history-lookup bench-peers bench-progress

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

up: ## Start the local stack (PostgreSQL, a 3-node Apache Kafka, SeaweedFS, ML API), installing what is missing
	@scripts/stack.sh up

down: ## Stop what `make up` started
	@scripts/stack.sh down

status: ## Show which services run and answer
	@scripts/stack.sh status

run: up ## Start the stack, the two simulated producers and the streaming service (Ctrl-C stops them)
	@scripts/run.sh

test: up ## Run every test: lint, unit, and integration against the local stack
	@echo "[test] clippy and fmt"
	@cargo fmt --all -- --check
	@cargo clippy --all-targets -- -D warnings
	@echo "[test] unit and integration tests (cargo nextest), all but the broker scenarios"
	@cargo nextest run --no-fail-fast -E 'not test(/^broker_chaos::/)'
	@echo "[test] the broker scenarios, one at a time: they stop and start the cluster's own nodes"
	@cargo nextest run --no-fail-fast --test-threads 1 -E 'test(/^broker_chaos::/)'

test-unit: ## Unit tests only (no stack needed)
	@cargo nextest run --lib

test-airflow: up ## The Airflow DAG: integrity in Apache Airflow 3.1 from PyPI, then airflow dags test against a local txnflow
	@bash scripts/test-airflow.sh

CHAOS_REPORT := $(CURDIR)/target/chaos-report.md

chaos: up ## The chaos suite at full load (30,000 events + 10,000 batch rows per scenario: the local Kafka cluster, its nodes' own faults, and a 3-broker mock cluster); prints its table
	@mkdir -p target
	@printf '| scenario | broker | events | read | lost | duplicated | unpredicted | dead-lettered | actor restarts | recovery | peak lag | commits ahead of rows | peak RSS | took | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n' > $(CHAOS_REPORT)
	@CHAOS_SCALE=full CHAOS_REPORT=$(CHAOS_REPORT) cargo nextest run --test integration -E 'test(/^chaos::|^mock_cluster::chaos_/)' --no-fail-fast --test-threads 2; \
	  status=$$?; \
	  CHAOS_SCALE=full CHAOS_REPORT=$(CHAOS_REPORT) cargo nextest run --test integration -E 'test(/^broker_chaos::/)' --no-fail-fast --test-threads 1 || status=1; \
	  echo; cat $(CHAOS_REPORT); exit $$status

FUZZ_SECONDS ?= 60

fuzz: ## Fuzz the event decoder/validator and the CSV rules, FUZZ_SECONDS (60) each; new inputs join fuzz/corpus/
	@command -v cargo-fuzz >/dev/null || { echo "[fuzz] installing cargo-fuzz (one time, a few minutes)"; cargo install cargo-fuzz --locked; }
	@for target in event csv_row; do \
	  echo "[fuzz] $$target for $(FUZZ_SECONDS) s (stable Rust: --sanitizer none)"; \
	  cargo fuzz run --sanitizer none $$target -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

bench-ml-api: ## Throughput of the reference ML API in batches of 100
	@cargo bench --bench ml_api

bench-pipeline: up ## End-to-end throughput beside psql \copy, latency at the seed rate, peak memory
	@cargo bench --bench pipeline

bench-batch: up ## txnflow batch of 1M rows from S3 beside psql \copy; peak RSS at 1M and 5M rows
	@cargo bench --bench batch

bench-progress: up ## The progress bar of a 1M-row txnflow batch in a pseudo-terminal: its time left at 25, 50 and 75% against the time it took
	@BENCH_PROGRESS_ETA=1 BENCH_REPREDICT=0 cargo bench --bench batch

bench-schemas: up ## Streaming with plain JSON events against Avro events through the registry, rotated, 3 x 1M keyed events
	@BENCH_FORMATS=$${BENCH_FORMATS:-json,avro} BENCH_EVENTS=$${BENCH_EVENTS:-1000000} cargo bench --bench pipeline

bench-tracing: up ## Streaming with tracing off, at sample ratio 0.01 and at 1.0, rotated, 3 x 1M keyed events with traceparent headers
	@BENCH_TRACING=1 BENCH_EVENTS=$${BENCH_EVENTS:-1000000} cargo bench --bench pipeline

bench-peers: up ## Kafka Connect + the Debezium JDBC sink against txnflow on the same events, 3 x 1M keyed; its last line is `bench-peers: txnflow=… peer=… ratio_to_peer=… share_of_ceiling=…`
	@BENCH_PEER=1 BENCH_EVENTS=$${BENCH_EVENTS:-1000000} cargo bench --bench pipeline

# The baseline of bench-history: this commit with its history writes taken
# out (scripts/no-history.patch), the same build in every other way.
HEAD_REV = $(shell git rev-parse --short HEAD)

bench-history: up ## Streaming with prediction history against this commit with its history writes taken out, alternated, 5 x 1M keyed events
	@scripts/build-baseline.sh $(HEAD_REV) target/baseline/txnflow-$(HEAD_REV)-no-history scripts/no-history.patch
	@BENCH_BASELINE_BIN=target/baseline/txnflow-$(HEAD_REV)-no-history BENCH_BASELINE_NAME="no history ($(HEAD_REV), patched)" \
	  BENCH_RUNS=$${BENCH_RUNS:-5} BENCH_EVENTS=$${BENCH_EVENTS:-1000000} cargo bench --bench pipeline

bench-history-lookup: up ## One transaction's history at 10M history rows: lookup latency and append cost of each index candidate
	@scripts/bench-history-lookup.sh
