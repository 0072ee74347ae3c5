DROP VIEW IF EXISTS transaction_stats;
DROP VIEW IF EXISTS transactions_with_predictions;
DROP VIEW IF EXISTS unprocessed_transactions;
DROP TABLE IF EXISTS predictions;
DROP TABLE IF EXISTS transactions;
DROP FUNCTION IF EXISTS set_updated_at();
