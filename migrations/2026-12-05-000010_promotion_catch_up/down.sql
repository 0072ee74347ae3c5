ALTER TABLE model_promotions DROP COLUMN IF EXISTS catch_up_from;
