"""DAG integrity check for `make test-airflow`: the DAG loads in the Airflow
installed in .stack/airflow-venv, with the schedule, tasks, catch-up, single
active run and run-id handling the deployment relies on."""

import os
import sys
from datetime import datetime

from airflow.models.dagbag import DagBag

DAGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dags")

bag = DagBag(dag_folder=DAGS, include_examples=False)
assert not bag.import_errors, f"import errors: {bag.import_errors}"
dag = bag.dags.get("txnflow_batch")
assert dag is not None, f"no txnflow_batch DAG in {sorted(bag.dag_ids)}"
schedule = getattr(dag, "schedule", None) or getattr(dag, "timetable").summary
assert str(schedule) == "@monthly", f"schedule {schedule!r}"
assert dag.catchup is True, "catch-up"
assert dag.max_active_runs == 1, f"max_active_runs {dag.max_active_runs}"
assert [task.task_id for task in dag.tasks] == ["load_month"], dag.tasks

sys.path.insert(0, DAGS)
import txnflow_batch  # noqa: E402

# The run id is Airflow's own: the task receives it from the context and
# passes it through unchanged; the month is the interval's start.
assert txnflow_batch.month_uri(datetime(2026, 1, 1), "transactions") == "s3://transactions/month=2026-01/"
assert "run_id" in txnflow_batch.load_month.__code__.co_varnames[: txnflow_batch.load_month.__code__.co_argcount]
print("DAG txnflow_batch: @monthly, catchup, max_active_runs=1, task load_month, run id = Airflow's run id")
