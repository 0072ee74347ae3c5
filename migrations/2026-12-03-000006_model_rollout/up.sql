-- Model rollouts: re-prediction runs, promotions, and the index they read
-- history by.

-- One version's history in time order: promote walks it in chunks, compare
-- and archive read a version's rows from it, and "the latest of version V
-- for these transactions" is a range of it. Rows arrive in time order, so
-- inserts land at the right edge of each version's range; one leading on
-- transaction_id costs every flush a random B-tree insert (measured 23%
-- more PostgreSQL CPU per row).
CREATE INDEX IF NOT EXISTS idx_prediction_history_version_time
    ON prediction_history (model_version, predicted_at, transaction_id);

-- Re-prediction runs, recorded so that a run outlives the process that ran
-- it, resumes where it stopped, and answers GET /repredictions/<run_id> on
-- any replica. The process running a run holds a session advisory lock on
-- its id (released by PostgreSQL when that process dies), so one run id
-- never runs twice at once.
CREATE TABLE IF NOT EXISTS repredict_runs (
    run_id        TEXT PRIMARY KEY,
    status        TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    -- The selection: transactions whose "timestamp" is in [since, until),
    -- and whose current prediction is from_model's; NULL: no bound.
    since         TIMESTAMPTZ,
    until         TIMESTAMPTZ,
    from_model    VARCHAR(50),
    instance      TEXT NOT NULL,
    -- Transactions selected when the run started (the backlog's size).
    selected      BIGINT NOT NULL DEFAULT 0,
    -- Transactions re-predicted (one history row each) and failed.
    predicted     BIGINT NOT NULL DEFAULT 0,
    failed        BIGINT NOT NULL DEFAULT 0,
    -- The last transaction id of the last chunk done: a resumed run goes on after it.
    resume_after  UUID,
    -- The model version the API answered last.
    model_version VARCHAR(50),
    error         TEXT,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ
);

-- The transactions a run could not re-predict (the API refused them, or
-- answered them unusably), with the reason: each selected transaction ends
-- in history or here, once per run.
CREATE TABLE IF NOT EXISTS repredict_failures (
    run_id         TEXT NOT NULL REFERENCES repredict_runs (run_id) ON DELETE CASCADE,
    transaction_id UUID NOT NULL,
    reason         TEXT NOT NULL,
    failed_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, transaction_id)
);

-- Promotions: where each one is, so that an interrupted promote resumes.
-- Starting one supersedes any other left unfinished.
CREATE TABLE IF NOT EXISTS model_promotions (
    model_version         VARCHAR(50) PRIMARY KEY,
    status                TEXT NOT NULL CHECK (status IN ('running', 'completed', 'superseded')),
    -- The last history row done, in (predicted_at, transaction_id) order.
    resume_at             TIMESTAMPTZ,
    resume_transaction_id UUID,
    examined              BIGINT NOT NULL DEFAULT 0,
    promoted              BIGINT NOT NULL DEFAULT 0,
    started_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at           TIMESTAMPTZ
);
