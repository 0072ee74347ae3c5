-- Limits that keep one record from stalling the service (contract §2.9).

-- The backfill's book of stored transactions that still lack a prediction:
-- how often each was tried, when it may be tried again (exponential
-- backoff), and, past backfill.max_attempts, that it was given up on. A row
-- is claimed by moving next_attempt_at forward, under FOR NO KEY UPDATE
-- SKIP LOCKED, so replicas never claim the same transaction; it is deleted
-- when the prediction is stored.
CREATE TABLE IF NOT EXISTS prediction_backlog (
    transaction_id  UUID PRIMARY KEY REFERENCES transactions (id) ON DELETE CASCADE,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    refused_at      TIMESTAMPTZ
);

-- Transactions the backfill stopped predicting, with why.
CREATE VIEW refused_predictions AS
SELECT t.id, t.description, t.created_at, b.attempts, b.last_error, b.refused_at
FROM prediction_backlog b
JOIN transactions t ON t.id = b.transaction_id
WHERE b.refused_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.transaction_id = b.transaction_id);

-- Dead letters the DLQ topic refused for good (too large, not authorised,
-- no such topic), with the DLQ headers as columns. `txnflow dlq list` shows
-- them and `txnflow dlq replay --from-table` feeds them back. One row per
-- source and error type: a record dead-lettered again replaces its row.
CREATE TABLE IF NOT EXISTS dead_letters (
    id             BIGSERIAL PRIMARY KEY,
    topic          TEXT NOT NULL,
    record_key     BYTEA,
    record_value   BYTEA NOT NULL,
    error_type     TEXT NOT NULL CHECK (error_type IN ('invalid', 'prediction_failed', 'persist_failed')),
    error_message  TEXT NOT NULL,
    stage          TEXT NOT NULL,
    failed_at      TIMESTAMPTZ NOT NULL,
    attempts       INTEGER NOT NULL,
    source         TEXT NOT NULL,
    run_id         TEXT,
    service        TEXT NOT NULL,
    -- Why the topic did not take it.
    refused_by     TEXT NOT NULL,
    stored_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at    TIMESTAMPTZ,
    UNIQUE (source, error_type)
);
