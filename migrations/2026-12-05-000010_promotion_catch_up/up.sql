-- The earliest start of a transaction that may have written history
-- unseen by a promotion's walk: a history row's predicted_at is its
-- writer's start, so rows that commit behind the walk are at or after it,
-- and the promotion's last pass goes over them again.
ALTER TABLE model_promotions ADD COLUMN IF NOT EXISTS catch_up_from TIMESTAMPTZ;
