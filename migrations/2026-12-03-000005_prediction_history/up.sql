-- Prediction history across model versions. `predictions` stays one
-- current row per transaction, as the seed's queries expect; every
-- prediction stored is also appended here, in the same database
-- transaction as the change to `predictions` it goes with (re-predictions
-- and shadow scores are written here only).
--
-- No foreign key to `transactions`: each row would fire a referential
-- check on the hottest write path, and every writer takes its ids from a
-- transaction stored in the same database transaction or read from the
-- table. Transactions are kept forever.
CREATE TABLE IF NOT EXISTS prediction_history (
    transaction_id   UUID NOT NULL,
    category         VARCHAR(100) NOT NULL,
    confidence_score DOUBLE PRECISION NOT NULL
        CONSTRAINT prediction_history_confidence_score_check CHECK (confidence_score >= 0 AND confidence_score <= 1),
    model_version    VARCHAR(50) NOT NULL,
    predicted_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- How the prediction was made; `migrated`: a current prediction found
    -- when this table was created, so that it can be promoted back.
    kind             VARCHAR(16) NOT NULL
        CONSTRAINT prediction_history_kind_check CHECK (kind IN ('pipeline', 'backfill', 'repredict', 'shadow', 'migrated')),
    run_id           TEXT
);

-- Time ranges (archive, per-version counts over a period): rows arrive in
-- time order, so a BRIN index is small and nearly free to keep. A B-tree
-- for the latest per transaction and version is left to the migration
-- that adds promote and compare: on the flush path, one on
-- (transaction_id, …) cost 23% more PostgreSQL CPU per row, and one on
-- (model_version, predicted_at, transaction_id) about 8%.
CREATE INDEX IF NOT EXISTS idx_prediction_history_predicted_at
    ON prediction_history USING brin (predicted_at);
-- One row per transaction in a re-prediction run, however often it resumes.
CREATE UNIQUE INDEX IF NOT EXISTS idx_prediction_history_repredict_run
    ON prediction_history (run_id, transaction_id) WHERE kind = 'repredict';

-- Archived history: the same columns, moved by `txnflow archive predictions`.
CREATE TABLE IF NOT EXISTS prediction_history_archive (LIKE prediction_history INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE prediction_history_archive ADD COLUMN IF NOT EXISTS archived_at TIMESTAMPTZ NOT NULL DEFAULT now();

INSERT INTO prediction_history (transaction_id, category, confidence_score, model_version, predicted_at, kind)
SELECT p.transaction_id, p.category, p.confidence_score, p.model_version, p.predicted_at, 'migrated'
FROM predictions p
WHERE NOT EXISTS (SELECT 1 FROM prediction_history h WHERE h.transaction_id = p.transaction_id);

-- The model versions seen, with their counts, how many transactions each
-- has predicted (coverage, of all stored), how many of the current
-- predictions are its, and when it first and last predicted.
CREATE OR REPLACE VIEW model_versions AS
WITH total AS (SELECT count(*) AS transactions FROM transactions),
     current AS (SELECT model_version, count(*) AS current_predictions FROM predictions GROUP BY model_version),
     history AS (
         SELECT model_version, count(*) AS predictions, count(DISTINCT transaction_id) AS transactions,
                min(predicted_at) AS first_prediction_at, max(predicted_at) AS last_prediction_at
         FROM prediction_history GROUP BY model_version
     )
SELECT coalesce(h.model_version, c.model_version) AS model_version,
       coalesce(h.predictions, 0) AS predictions,
       coalesce(h.transactions, 0) AS transactions,
       CASE WHEN total.transactions = 0 THEN 0.0
            ELSE round(100.0 * coalesce(h.transactions, 0) / total.transactions, 2) END AS coverage_pct,
       coalesce(c.current_predictions, 0) AS current_predictions,
       h.first_prediction_at,
       h.last_prediction_at
FROM history h
FULL JOIN current c ON c.model_version = h.model_version
CROSS JOIN total;
