DROP VIEW IF EXISTS model_versions;
DROP TABLE IF EXISTS prediction_history_archive;
DROP TABLE IF EXISTS prediction_history;
