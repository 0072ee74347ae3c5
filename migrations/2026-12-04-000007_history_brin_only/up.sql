-- No B-tree on prediction_history: every flush appends a history row per
-- prediction, and a B-tree takes an index insert and its WAL record for
-- each, from every writing connection at the same right edge. Measured on
-- the streaming path (1,000,000 keyed events, against the build that wrote
-- no history): with the B-tree on (model_version, predicted_at,
-- transaction_id), 0.85 of the rate; on (model_version, predicted_at),
-- 0.88. Promote and archive walk history in time windows through the BRIN
-- index on predicted_at instead, and compare reads each version whole.
DROP INDEX IF EXISTS idx_prediction_history_version_time;

-- A promotion resumes at the start of its next time window: every row of
-- the version predicted before resume_at is done, so no tie-breaker id.
ALTER TABLE model_promotions DROP COLUMN IF EXISTS resume_transaction_id;
