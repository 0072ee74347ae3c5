-- Batch runs (contract §7), recorded so that any replica answers
-- GET /batches/<run_id>, a run id runs in one place at a time, and a run
-- outlives the process that ran it.
CREATE TABLE IF NOT EXISTS batch_runs (
    run_id     TEXT PRIMARY KEY,
    uri        TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    -- The process running it (host/pid); only it updates a running run.
    instance   TEXT NOT NULL,
    -- The run's last GET /batches/<run_id> answer, as that process saw it.
    report     JSONB NOT NULL,
    -- That process's last heartbeat: a running run not updated for
    -- batch.stale_after_ms is reported "interrupted", and may be taken over.
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
