#!/usr/bin/env bash
# `make run`: the streaming service and the seed system's two simulated
# producers, on the local stack (already started by `make up`). The service
# prints a progress line every 5 s; Ctrl-C stops both cleanly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/debug/txnflow"
LOGS="$ROOT/.stack/logs"
mkdir -p "$LOGS"

# Whether the environment or config/local.toml's [admin] section sets a
# token or a token file (a non-empty one).
admin_token_configured() {
  [[ -n "${TXNFLOW__ADMIN__TOKEN:-}" || -n "${TXNFLOW__ADMIN__TOKEN_FILE:-}" ]] && return 0
  [[ -f "$ROOT/config/local.toml" ]] || return 1
  awk '/^[[:space:]]*\[/ { admin = ($0 ~ /^[[:space:]]*\[admin\][[:space:]]*$/) }
       admin && /^[[:space:]]*token(_file)?[[:space:]]*=[[:space:]]*"[^"]+"/ { found = 1 }
       END { exit !found }' "$ROOT/config/local.toml"
}

# The status page is behind the admin token: one made for this run unless
# the environment or config/local.toml gives one.
token_note="sign in with admin.token from your configuration"
if ! admin_token_configured; then
  TXNFLOW__ADMIN__TOKEN="$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')"
  export TXNFLOW__ADMIN__TOKEN
  token_note="sign in with the token $TXNFLOW__ADMIN__TOKEN (made for this run; set TXNFLOW__ADMIN__TOKEN to choose one)"
fi

# The service's log goes to the terminal as it is; its start line gives
# the page's address, said again here with the token to use.
announce_page() {
  # Ctrl-C is for the service, which logs while it stops: this reader stays until its last line.
  trap '' INT TERM
  local line page
  while IFS= read -r line; do
    printf '%s\n' "$line" >&2
    # The start line, in the text log format (page=URL) or the JSON one ("page":"URL").
    if [[ "$line" == *"txnflow is running"* && "$line" =~ page[=\"\:]+(http://[^[:space:]\"]+) ]]; then
      page="${BASH_REMATCH[1]}"
      printf '[run] status page: %s (%s)\n' "$page" "$token_note" >&2
    fi
  done
}

"$BIN" run 2> >(announce_page) &
service=$!
# The first producer writes plain JSON, the second Avro framed for the
# schema registry: one topic holding both, as during a move to a registry.
"$BIN" produce --invalid-ratio 0.02 --traceparent --format json,avro >"$LOGS/producer.log" 2>&1 &
producer=$!
echo "[run] service pid $service (the status page's address follows once it runs), producers pid $producer (log .stack/logs/producer.log); Ctrl-C to stop"

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
