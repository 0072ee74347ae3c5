#!/usr/bin/env bash
# make test-airflow: the DAG against Apache Airflow from PyPI, then a real
# `airflow dags test` run against a local `txnflow run`, checked in PostgreSQL.
# Kept out of `make test`: Airflow is ~250 packages and takes a few minutes
# to install the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STACK="$ROOT/.stack"
VENV="$STACK/airflow-venv"
AIRFLOW_VERSION=3.1.8
export AIRFLOW_HOME="$STACK/airflow-home"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/orchestration/dags"
log() { echo "[test-airflow $(date +%H:%M:%S)] $*"; }

if [[ ! -x "$VENV/bin/airflow" ]] || ! "$VENV/bin/pip" show apache-airflow 2>/dev/null | grep -q "^Version: $AIRFLOW_VERSION$"; then
  log "installing apache-airflow $AIRFLOW_VERSION and boto3 into .stack/airflow-venv (first time: a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --progress-bar off -q "apache-airflow==$AIRFLOW_VERSION" boto3
fi
"$VENV/bin/pip" show boto3 >/dev/null 2>&1 || "$VENV/bin/pip" install --progress-bar off -q boto3

log "DAG integrity (orchestration/check_dag.py)"
"$VENV/bin/python" "$ROOT/orchestration/check_dag.py" 2>/dev/null | tail -1

log "preparing Airflow's database (sqlite under .stack/airflow-home)"
"$VENV/bin/airflow" db migrate >"$STACK/logs/airflow-db.log" 2>&1

RUN="airflow$(date +%s)"
DB="txnflow_$RUN"
ADMIN_PORT=18095
PGPASSWORD=txnflow psql -h 127.0.0.1 -U txnflow -d txnflow -qc "CREATE DATABASE $DB"
DB_URL="postgres://txnflow:txnflow@127.0.0.1:5432/$DB"
PREFIX="$RUN/month=2026-01/"
log "uploading deploy/sample/transactions-sample.csv to s3://transactions/$PREFIX"
"$VENV/bin/python" - "$ROOT/deploy/sample/transactions-sample.csv" "$PREFIX" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:8333", aws_access_key_id="txnflow",
                  aws_secret_access_key="txnflow", region_name="us-east-1",
                  config=boto3.session.Config(s3={"addressing_style": "path"}))
s3.upload_file(sys.argv[1], "transactions", sys.argv[2] + "transactions-sample.csv")
PY

log "starting txnflow run (database $DB, admin 127.0.0.1:$ADMIN_PORT)"
TXNFLOW__DB__URL="$DB_URL" TXNFLOW__KAFKA__TOPIC="$RUN" TXNFLOW__KAFKA__DLQ_TOPIC="$RUN-dlq" \
  TXNFLOW__KAFKA__GROUP_ID="$RUN" TXNFLOW__ADMIN__LISTEN="127.0.0.1:$ADMIN_PORT" \
  "$ROOT/target/debug/txnflow" run >"$STACK/logs/airflow-txnflow.log" 2>&1 &
SERVICE=$!
trap 'kill $SERVICE 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null && break; sleep 0.2; done

log "airflow dags test txnflow_batch 2026-01-01"
# The DAG's bucket prefix for this test: month partitions under $RUN/.
TXNFLOW_ADMIN_URL="http://127.0.0.1:$ADMIN_PORT" TXNFLOW_BUCKET="transactions/$RUN" \
  "$VENV/bin/airflow" dags test txnflow_batch 2026-01-01 >"$STACK/logs/airflow-dags-test.log" 2>&1 \
  || { tail -30 "$STACK/logs/airflow-dags-test.log"; exit 1; }
grep -o "read [0-9]* valid [0-9]* invalid [0-9]* predicted [0-9]* written [0-9]* already-stored [0-9]* dead-lettered [0-9]* in [0-9.]* s" \
  "$STACK/logs/airflow-dags-test.log" | tail -1

ROWS=$(PGPASSWORD=txnflow psql -h 127.0.0.1 -U txnflow -d "$DB" -Atc \
  "SELECT count(*) FROM transactions t JOIN predictions p ON p.transaction_id = t.id
   WHERE t.processing_type = 'batch' AND t.run_id LIKE 'manual\_\_%'
     AND t.batch_id = 's3://transactions/${PREFIX}transactions-sample.csv'")
log "rows written by the DAG run, with predictions and lineage: $ROWS (expected 5)"
[[ "$ROWS" == 5 ]] || { echo "expected exactly 5 rows"; exit 1; }
PGPASSWORD=txnflow psql -h 127.0.0.1 -U txnflow -d txnflow -qc "DROP DATABASE $DB WITH (FORCE)"
log "passed"
