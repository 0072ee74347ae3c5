//! JSON log lines as flat objects (`log.format = "json"`).
//!
//! tracing-subscriber's own JSON format nests span fields under `span` and
//! `spans`. Here an event's fields and those of every span it is in are
//! top-level keys of one object, so a log store's field index (or
//! `jq 'select(.run_id == "…")'`) finds them directly. The spans the pipeline
//! opens carry the names operators search by:
//!
//! - `actor`: the actor a line comes from (every actor's thread);
//! - `flush_id`: the Buffer flush a record batch belongs to;
//! - `run_id`: the batch run.
//!
//! An inner span's field wins over an outer one's, and the event's own field
//! over both.

use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter; pair it with [`JsonFields`], which records span
/// fields as JSON objects.
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        if let Some(scope) = context.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields)
                {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut EventFields(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Copies an event's fields into the line, keeping numbers and booleans typed.
struct EventFields<'a>(&'a mut Map<String, Value>);

impl EventFields<'_> {
    fn put(&mut self, field: &Field, value: impl Into<Value>) {
        self.0.insert(field.name().to_string(), value.into());
    }
}

impl Visit for EventFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what the layer writes, in memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    fn logged(emit: impl FnOnce()) -> Vec<Value> {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|line| serde_json::from_str(line).expect("each line is one JSON object")).collect()
    }

    #[test]
    fn span_fields_are_top_level_keys_inner_ones_winning() {
        let lines = logged(|| {
            let _actor = tracing::info_span!("actor", actor = "db_writer").entered();
            let _run = tracing::info_span!("batch_run", run_id = "2026-01").entered();
            let _flush = tracing::info_span!("flush", flush_id = 7u64, run_id = "inner").entered();
            tracing::warn!(attempt = 2, retried = true, ratio = 0.5, "write failed");
        });
        assert_eq!(lines.len(), 1);
        let line = lines[0].as_object().unwrap();
        assert_eq!(line["actor"], "db_writer");
        assert_eq!(line["flush_id"], 7);
        assert_eq!(line["run_id"], "inner", "the inner span wins");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["retried"], true);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["message"], "write failed");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], module_path!());
        assert!(line["timestamp"].as_str().unwrap().starts_with("20"), "{line:?}");
    }

    #[test]
    fn an_event_outside_spans_has_its_own_fields_only() {
        let error = std::io::Error::other("refused");
        let lines = logged(|| tracing::error!(%error, count = -3i64, ?error, "plain"));
        let line = lines[0].as_object().unwrap();
        assert_eq!(line["message"], "plain");
        assert_eq!(line["count"], -3);
        assert!(line["error"].as_str().unwrap().contains("refused"));
        let mut keys: Vec<&str> = line.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["count", "error", "level", "message", "target", "timestamp"]);
    }

    #[test]
    fn the_event_field_wins_over_a_span_field() {
        let lines = logged(|| {
            let _flush = tracing::info_span!("flush", flush_id = 1u64).entered();
            tracing::info!(flush_id = 2u64, "own");
        });
        assert_eq!(lines[0]["flush_id"], 2);
    }
}
