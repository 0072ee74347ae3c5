DROP TABLE IF EXISTS repredict_selection;
