-- One transaction's predictions (`txnflow models history`,
-- `GET /transactions/<id>/predictions`) without scanning the history.
-- Measured at 10,000,000 history rows (scripts/bench-history-lookup.sh):
-- a lookup takes 0.27 ms at the median and 0.68 ms at p99 with a hash
-- index, 0.83 ms with a B-tree, 450 ms with neither; appending costs
-- PostgreSQL 11.1 µs a row with the hash index, 12.8 with the B-tree and
-- 4.0 with neither. A hash index only answers equality, which is all a
-- lookup asks. Building it takes about 15 s per 10,000,000 rows, during
-- which writes to the table wait.
CREATE INDEX IF NOT EXISTS idx_prediction_history_transaction
    ON prediction_history USING hash (transaction_id);
CREATE INDEX IF NOT EXISTS idx_prediction_history_archive_transaction
    ON prediction_history_archive USING hash (transaction_id);
