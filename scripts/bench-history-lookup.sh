#!/usr/bin/env bash
# One transaction's history at 10,000,000 history rows: the lookup's
# latency and the write cost of each index candidate, on the local stack's
# PostgreSQL (make up). Prints a table; writes nothing outside its own
# database, which it drops at the end.
#
#   scripts/bench-history-lookup.sh    (HISTORY_ROWS=10000000, LOOKUPS=1000, INSERT_ROWS=1000000)
#
# The history is generated as the pipeline writes it: in time order, each
# of HISTORY_ROWS/2 transactions predicted by v0 and, later, by v1 (a
# re-prediction), with ids spread like txnflow's (name-based UUIDs).
# Candidates:
# - brin: the BRIN index on predicted_at only (what ships before this):
#   a lookup scans the table; timed on 5 lookups.
# - hash: a hash index on transaction_id.
# - btree: a B-tree on transaction_id.
# For each: the index's size and build time, the lookup's p50/p99/max over
# LOOKUPS random ids (pgbench, one client), and the rate of appending
# INSERT_ROWS more rows in flushes of 2,000 from 4 clients, as the
# DbWriter does, with PostgreSQL's CPU for them.
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
ROWS="${HISTORY_ROWS:-10000000}"
LOOKUPS="${LOOKUPS:-1000}"
INSERT_ROWS="${INSERT_ROWS:-1000000}"
ADMIN="postgres://txnflow:txnflow@127.0.0.1:5432/txnflow"
DB="bench_history_lookup_$$"
URL="postgres://txnflow:txnflow@127.0.0.1:5432/$DB"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
say() { echo "[history-lookup $(date +%H:%M:%S)] $*"; }

# The CPU seconds of PostgreSQL's processes, ended ones included.
pg_cpu() {
  local ticks total=0 pid
  ticks=$(getconf CLK_TCK)
  for pid in $(pgrep -x postgres); do
    # utime stime cutime cstime: fields 14-17 of /proc/PID/stat.
    total=$(awk -v t="$total" '{print t + $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo "$total")
  done
  awk -v t="$total" -v hz="$ticks" 'BEGIN {printf "%.1f", t / hz}'
}

psql "$ADMIN" -qc "CREATE DATABASE $DB"
TXNFLOW="${TXNFLOW_BIN:-$ROOT/target/release/txnflow}"
[[ -x "$TXNFLOW" ]] || TXNFLOW="$ROOT/target/debug/txnflow"
TXNFLOW__DB__URL="$URL" "$TXNFLOW" migrate >/dev/null
half=$((ROWS / 2))
say "generating $ROWS history rows ($half transactions, v0 then v1)"
started=$(date +%s.%N)
psql "$URL" -q <<SQL
INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, predicted_at, kind)
SELECT md5((i % $half)::text)::uuid, 'Food', 0.9, 'v' || (i / $half),
       now() - interval '1 millisecond' * ($ROWS - i), CASE WHEN i < $half THEN 'pipeline' ELSE 'repredict' END
FROM generate_series(0, $ROWS - 1) AS i;
VACUUM ANALYZE prediction_history;
SQL
say "generated in $(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.0f", e - s}') s; table $(psql "$URL" -Atc "SELECT pg_size_pretty(pg_table_size('prediction_history'))")"

cat >"$WORK/lookup.sql" <<SQL
\set i random(0, $((half - 1)))
(SELECT category, confidence_score, model_version, predicted_at, kind, run_id, false AS archived
 FROM prediction_history WHERE transaction_id = md5(:i::text)::uuid)
UNION ALL
(SELECT category, confidence_score, model_version, predicted_at, kind, run_id, true AS archived
 FROM prediction_history_archive WHERE transaction_id = md5(:i::text)::uuid)
ORDER BY predicted_at DESC LIMIT 101;
SQL
cat >"$WORK/insert.sql" <<'SQL'
INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, kind)
SELECT md5(random()::text)::uuid, 'Food', 0.9, 'v2', 'pipeline' FROM generate_series(1, 2000);
SQL

# p50, p99 and max in ms of the per-transaction log pgbench wrote.
percentiles() {
  cat "$WORK"/log.* | awk '{print $3 / 1000}' | sort -n | awk '
    {v[NR] = $1} END {printf "%.2f %.2f %.2f", v[int(NR * 0.5) + 1], v[int(NR * 0.99) + (NR * 0.99 > int(NR * 0.99))], v[NR]}'
}

declare -a lines
for candidate in brin hash btree; do
  case "$candidate" in
    brin) index="" ;;
    hash) index="CREATE INDEX idx_lookup ON prediction_history USING hash (transaction_id)" ;;
    btree) index="CREATE INDEX idx_lookup ON prediction_history (transaction_id)" ;;
  esac
  psql "$URL" -qc "DROP INDEX IF EXISTS idx_lookup"
  build="-" size="-"
  if [[ -n "$index" ]]; then
    say "$candidate: building the index"
    started=$(date +%s.%N)
    psql "$URL" -qc "$index"
    build=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.0f s", e - s}')
    size=$(psql "$URL" -Atc "SELECT pg_size_pretty(pg_relation_size('idx_lookup'))")
  fi
  psql "$URL" -qc "ANALYZE prediction_history"
  count=$LOOKUPS
  [[ "$candidate" == brin ]] && count=5
  say "$candidate: $count lookups"
  rm -f "$WORK"/log.*
  (cd "$WORK" && pgbench -n -c 1 -t "$count" -f lookup.sql -l --log-prefix=log "$URL" >/dev/null 2>&1)
  read -r p50 p99 max <<<"$(percentiles)"
  flushes=$((INSERT_ROWS / 2000 / 4))
  say "$candidate: appending $((flushes * 4 * 2000)) rows in flushes of 2,000 from 4 clients"
  cpu_before=$(pg_cpu)
  started=$(date +%s.%N)
  pgbench -n -c 4 -t "$flushes" -f "$WORK/insert.sql" "$URL" >/dev/null 2>&1
  seconds=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {print e - s}')
  cpu=$(awk -v a="$cpu_before" -v b="$(pg_cpu)" 'BEGIN {printf "%.1f", b - a}')
  rate=$(awk -v n="$((flushes * 4 * 2000))" -v s="$seconds" 'BEGIN {printf "%.0f", n / s}')
  per_row=$(awk -v c="$cpu" -v n="$((flushes * 4 * 2000))" 'BEGIN {printf "%.1f", c * 1e6 / n}')
  # Back to ROWS rows for the next candidate.
  psql "$URL" -qc "DELETE FROM prediction_history WHERE model_version = 'v2'"
  psql "$URL" -qc "VACUUM prediction_history"
  lines+=("| $candidate | $size | $build | $p50 | $p99 | $max | $rate | $per_row |")
done
echo
echo "summary: one transaction's history at $ROWS rows ($LOOKUPS lookups; 5 for brin), PostgreSQL 15, this machine"
echo "| index on transaction_id | size | build | lookup p50 ms | p99 ms | max ms | append rows/s (4 clients, 2,000 a flush) | PostgreSQL CPU µs per row appended |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${lines[@]}"
