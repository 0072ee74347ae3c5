-- Leaves the views dropped: re-running the first migration's up.sql restores
-- the seed's versions of them.
DROP VIEW IF EXISTS transaction_stats;
DROP VIEW IF EXISTS transactions_with_predictions;
DROP VIEW IF EXISTS unprocessed_transactions;
DROP INDEX IF EXISTS idx_transactions_processing_type;
DROP INDEX IF EXISTS idx_transactions_run_id;
ALTER TABLE predictions DROP CONSTRAINT IF EXISTS predictions_confidence_score_check;
ALTER TABLE transactions DROP CONSTRAINT IF EXISTS transactions_processing_type_check;
ALTER TABLE transactions DROP CONSTRAINT IF EXISTS transactions_side_check;
ALTER TABLE transactions DROP COLUMN IF EXISTS source;
ALTER TABLE transactions DROP COLUMN IF EXISTS batch_id;
ALTER TABLE transactions DROP COLUMN IF EXISTS run_id;
ALTER TABLE transactions DROP COLUMN IF EXISTS processing_type;
