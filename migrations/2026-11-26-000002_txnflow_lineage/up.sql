-- txnflow's changes to the seed schema (contract §6):
--  * amount widened from NUMERIC(10,2) to NUMERIC(12,2) to hold |amount| < 10^10;
--  * merchant nullable: a missing merchant is not a reason to drop a transaction;
--  * lineage: how, in which run and batch, and from where each row arrived;
--  * checks that mirror the domain rules, as a last line of defence.
-- Views read the altered columns, so they are dropped first and re-created.

DROP VIEW IF EXISTS transaction_stats;
DROP VIEW IF EXISTS transactions_with_predictions;
DROP VIEW IF EXISTS unprocessed_transactions;

ALTER TABLE transactions ALTER COLUMN amount TYPE NUMERIC(12, 2);
ALTER TABLE transactions ALTER COLUMN merchant DROP NOT NULL;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS processing_type VARCHAR(16) NOT NULL DEFAULT 'streaming';
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS run_id TEXT;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS batch_id TEXT;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS source TEXT;

ALTER TABLE transactions DROP CONSTRAINT IF EXISTS transactions_side_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_side_check CHECK (side IN ('debit', 'credit'));
ALTER TABLE transactions DROP CONSTRAINT IF EXISTS transactions_processing_type_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_processing_type_check
    CHECK (processing_type IN ('streaming', 'batch'));
ALTER TABLE predictions DROP CONSTRAINT IF EXISTS predictions_confidence_score_check;
ALTER TABLE predictions ADD CONSTRAINT predictions_confidence_score_check
    CHECK (confidence_score >= 0 AND confidence_score <= 1);

CREATE INDEX IF NOT EXISTS idx_transactions_run_id ON transactions (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_transactions_processing_type ON transactions (processing_type);

CREATE VIEW unprocessed_transactions AS
SELECT t.*
FROM transactions t
WHERE NOT EXISTS (SELECT 1 FROM predictions p WHERE p.transaction_id = t.id);

CREATE VIEW transactions_with_predictions AS
SELECT t.id, t.description, t.amount, t."timestamp", t.merchant, t.operation_type, t.side,
       t.processing_type, t.run_id, t.batch_id, t.source, t.created_at,
       p.category, p.confidence_score, p.model_version, p.predicted_at
FROM transactions t
LEFT JOIN predictions p ON p.transaction_id = t.id;

CREATE VIEW transaction_stats AS
SELECT count(t.id)                                         AS total_transactions,
       count(p.transaction_id)                             AS predicted_transactions,
       count(t.id) - count(p.transaction_id)               AS unprocessed_transactions,
       CASE WHEN count(t.id) = 0 THEN 100.0
            ELSE round(100.0 * count(p.transaction_id) / count(t.id), 2)
       END                                                 AS prediction_coverage_pct,
       coalesce(sum(t.amount) FILTER (WHERE t.side = 'debit'), 0)  AS total_debits,
       coalesce(sum(t.amount) FILTER (WHERE t.side = 'credit'), 0) AS total_credits,
       count(t.id) FILTER (WHERE t.processing_type = 'streaming')  AS streaming_transactions,
       count(t.id) FILTER (WHERE t.processing_type = 'batch')      AS batch_transactions,
       min(t."timestamp")                                  AS first_transaction_at,
       max(t."timestamp")                                  AS last_transaction_at
FROM transactions t
LEFT JOIN predictions p ON p.transaction_id = t.id;
