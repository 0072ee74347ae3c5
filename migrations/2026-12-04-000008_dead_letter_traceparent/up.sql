-- A dead letter the DLQ topic refused keeps its record's W3C traceparent,
-- so that a replay from the table continues the record's trace, as a
-- replay from the topic does. NULL: the record came without one.
ALTER TABLE dead_letters ADD COLUMN traceparent text;
