"""Monthly txnflow batch runs over the bucket's ``month=YYYY-MM`` partitions.

One run per month, with catch-up, at most one active run. Each run asks the
txnflow service to load ``s3://<bucket>/month=YYYY-MM/`` through
``POST /batches``, with Airflow's run id as txnflow's run id, then polls
``GET /batches/<run_id>`` until the run is done; a failed run fails the task.
A retried task posts the same run id again: txnflow answers 409 while that
run is still going (the task then just polls), and a re-run of a finished
month inserts nothing new. Any replica answers for any run (txnflow records
runs in PostgreSQL); a run whose replica stopped is reported ``interrupted``
and is posted again, to resume on a live replica.

Settings (Airflow worker environment):
  TXNFLOW_ADMIN_URL  the service's admin HTTP address (default http://txnflow:8088)
  TXNFLOW_ADMIN_TOKEN  its admin.token, sent as a bearer token (none when empty)
  TXNFLOW_BUCKET     the bucket holding the month partitions (default transactions)
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.python import PythonOperator

POLL_SECONDS = 5


def month_uri(data_interval_start: datetime, bucket: str) -> str:
    """The partition a monthly run loads: the month its interval starts in."""
    return f"s3://{bucket}/month={data_interval_start:%Y-%m}/"


def _request(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    token = os.environ.get("TXNFLOW_ADMIN_TOKEN", "")
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def start(admin: str, uri: str, run_id: str) -> None:
    """POSTs the run; 409 means a replica is already running it, which is fine."""
    status, body = _request("POST", f"{admin}/batches", {"uri": uri, "run_id": run_id})
    if status not in (202, 409):
        raise RuntimeError(f"txnflow refused the batch {uri} ({status}): {body.get('error', body)}")
    print(f"txnflow batch run {run_id} for {uri}: {'started' if status == 202 else 'already running'}")


def load_month(run_id: str, data_interval_start: datetime, **_context) -> dict:
    """Starts the month's batch run in txnflow and waits for its outcome."""
    admin = os.environ.get("TXNFLOW_ADMIN_URL", "http://txnflow:8088").rstrip("/")
    uri = month_uri(data_interval_start, os.environ.get("TXNFLOW_BUCKET", "transactions"))
    start(admin, uri, run_id)
    while True:
        status, report = _request("GET", f"{admin}/batches/{run_id}")
        if status != 200:
            raise RuntimeError(f"txnflow lost track of run {run_id} ({status}): {report}")
        print(report.get("summary", report))
        if report["status"] == "completed":
            return report
        if report["status"] == "failed":
            raise RuntimeError(f"txnflow batch run {run_id} failed: {report.get('error')}")
        if report["status"] == "interrupted":
            # The replica running it stopped (killed, redeployed): any
            # replica resumes it; rows already stored are not written twice.
            print(f"txnflow batch run {run_id} interrupted ({report.get('error')}); starting it again")
            start(admin, uri, run_id)
        time.sleep(POLL_SECONDS)


with DAG(
    dag_id="txnflow_batch",
    description="Monthly txnflow batch runs over month=YYYY-MM partitions",
    schedule="@monthly",
    start_date=datetime(2026, 1, 1),
    catchup=True,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["txnflow"],
) as dag:
    PythonOperator(task_id="load_month", python_callable=load_month)
