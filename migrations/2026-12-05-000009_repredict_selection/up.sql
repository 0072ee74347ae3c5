-- The transactions a re-prediction run selected, fixed when it starts: a
-- promote, a backfill or a replay during the run changes a current
-- prediction, and must not move a transaction out of the run (or into
-- it). A run's rows are deleted when it completes.
CREATE TABLE IF NOT EXISTS repredict_selection (
    run_id         TEXT NOT NULL,
    transaction_id UUID NOT NULL,
    PRIMARY KEY (run_id, transaction_id)
);

-- Runs not completed when this migration runs keep going with the
-- selection as it is now: what their filter selects of the transactions
-- stored before they started.
INSERT INTO repredict_selection (run_id, transaction_id)
SELECT r.run_id, t.id
FROM repredict_runs r
JOIN transactions t
  ON (r.since IS NULL OR t."timestamp" >= r.since)
 AND (r.until IS NULL OR t."timestamp" < r.until)
 AND t.created_at <= r.started_at
 AND (r.from_model IS NULL OR EXISTS (
         SELECT 1 FROM predictions p WHERE p.transaction_id = t.id AND p.model_version = r.from_model))
WHERE r.status <> 'completed'
ON CONFLICT DO NOTHING;
