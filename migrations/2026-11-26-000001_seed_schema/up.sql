-- The replaced Python system's schema: its tables, indexes and views.
-- Written with IF NOT EXISTS so that it can be applied to a database where
-- the seed system already created them; the next migration widens it.

CREATE TABLE IF NOT EXISTS transactions (
    id             UUID PRIMARY KEY,
    description    TEXT NOT NULL,
    amount         NUMERIC(10, 2) NOT NULL,
    "timestamp"    TIMESTAMPTZ NOT NULL,
    merchant       VARCHAR(255) NOT NULL,
    operation_type VARCHAR(50) NOT NULL,
    side           VARCHAR(10) NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS predictions (
    id               BIGSERIAL PRIMARY KEY,
    transaction_id   UUID NOT NULL UNIQUE REFERENCES transactions (id) ON DELETE CASCADE,
    category         VARCHAR(100) NOT NULL,
    confidence_score DOUBLE PRECISION NOT NULL DEFAULT 1.0,
    model_version    VARCHAR(50) NOT NULL,
    predicted_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idx_transactions_timestamp ON transactions ("timestamp");
CREATE INDEX IF NOT EXISTS idx_transactions_merchant ON transactions (merchant);
CREATE INDEX IF NOT EXISTS idx_transactions_side ON transactions (side);
CREATE INDEX IF NOT EXISTS idx_predictions_category ON predictions (category);

-- Keeps updated_at true when a row is changed after its insert.
CREATE OR REPLACE FUNCTION set_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS transactions_set_updated_at ON transactions;
CREATE TRIGGER transactions_set_updated_at
    BEFORE UPDATE ON transactions
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

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
