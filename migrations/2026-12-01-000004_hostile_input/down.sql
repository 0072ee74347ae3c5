DROP TABLE IF EXISTS dead_letters;
DROP VIEW IF EXISTS refused_predictions;
DROP TABLE IF EXISTS prediction_backlog;
