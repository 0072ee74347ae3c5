-- Back to the seed schema, with its views. `amount` stays NUMERIC(12,2) and
-- `merchant` nullable: narrowing them could fail on rows stored since, and
-- the seed system reads the wider columns as well.
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

-- The seed's views, as the first migration creates them.
CREATE OR REPLACE VIEW unprocessed_transactions AS
SELECT t.*
FROM transactions t
LEFT JOIN predictions p ON p.transaction_id = t.id
WHERE p.transaction_id IS NULL;

CREATE OR REPLACE VIEW transactions_with_predictions AS
SELECT t.id, t.description, t.amount, t."timestamp", t.merchant, t.operation_type, t.side,
       p.category, p.confidence_score, p.model_version, p.predicted_at
FROM transactions t
LEFT JOIN predictions p ON p.transaction_id = t.id;

CREATE OR REPLACE VIEW transaction_stats AS
SELECT count(t.id)                                         AS total_transactions,
       count(p.transaction_id)                             AS predicted_transactions,
       count(t.id) - count(p.transaction_id)               AS unprocessed_transactions,
       CASE WHEN count(t.id) = 0 THEN 100.0
            ELSE round(100.0 * count(p.transaction_id) / count(t.id), 2)
       END                                                 AS prediction_coverage_pct,
       coalesce(sum(t.amount) FILTER (WHERE t.side = 'debit'), 0)  AS total_debits,
       coalesce(sum(t.amount) FILTER (WHERE t.side = 'credit'), 0) AS total_credits,
       min(t."timestamp")                                  AS first_transaction_at,
       max(t."timestamp")                                  AS last_transaction_at
FROM transactions t
LEFT JOIN predictions p ON p.transaction_id = t.id;
