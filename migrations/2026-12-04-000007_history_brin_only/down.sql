ALTER TABLE model_promotions ADD COLUMN IF NOT EXISTS resume_transaction_id UUID;
CREATE INDEX IF NOT EXISTS idx_prediction_history_version_time
    ON prediction_history (model_version, predicted_at, transaction_id);
