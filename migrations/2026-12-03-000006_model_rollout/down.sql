DROP TABLE IF EXISTS model_promotions;
DROP TABLE IF EXISTS repredict_failures;
DROP TABLE IF EXISTS repredict_runs;
DROP INDEX IF EXISTS idx_prediction_history_version_time;
