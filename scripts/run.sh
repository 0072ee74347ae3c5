#!/usr/bin/env bash
# `make run`: the streaming service and the seed system's two simulated
# producers, on the local stack (already started by `make up`). The service
# prints a progress line every 5 s; Ctrl-C stops both cleanly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/debug/txnflow"
LOGS="$ROOT/.stack/logs"
mkdir -p "$LOGS"

"$BIN" run &
service=$!
# The first producer writes plain JSON, the second Avro framed for the
# schema registry: one topic holding both, as during a move to a registry.
"$BIN" produce --invalid-ratio 0.02 --traceparent --format json,avro >"$LOGS/producer.log" 2>&1 &
producer=$!
echo "[run] service pid $service (its start line in the log names its admin address), producers pid $producer (log .stack/logs/producer.log); Ctrl-C to stop"

stop() {
  trap - INT TERM
  echo "[run] stopping the producers, then the service (it flushes and commits before exiting)"
  kill -TERM "$producer" 2>/dev/null || true
  wait "$producer" 2>/dev/null || true
  kill -TERM "$service" 2>/dev/null || true
  wait "$service"
  echo "[run] stopped (service exit status $?)"
  exit 0
}
trap stop INT TERM
wait "$service"
