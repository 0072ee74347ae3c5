//! `txnflow produce`: the seed system's two simulated producers.
//!
//! One producer sends 1–10 records every 0.5 s, the other 5–20 every 1.0 s,
//! as the seed's did. Records come from [`TransactionGenerator`], realistic
//! French bank transactions in the seed file's style, or from a CSV file
//! (`--from`). `--invalid-ratio` mixes in malformed records of every kind
//! the pipeline must dead-letter.

use chrono::Utc;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{KafkaConfig, SchemaRegistryConfig};
use crate::domain::csv_rules::{CsvLayout, detect_delimiter};
use crate::domain::schema_event::{EventSchema, SchemaFormat, transaction_schema_text};
use crate::domain::trace_context::{TRACEPARENT, new_traceparent};
use crate::kafka::schema_registry::SchemaRegistry;

/// Merchants of the seed file.
const MERCHANTS: [&str; 24] = [
    "Auchan",
    "Carrefour",
    "Leclerc",
    "Lidl",
    "Monoprix",
    "Franprix",
    "Intermarche",
    "Systeme U",
    "SNCF",
    "RATP",
    "Transilien",
    "Uber",
    "Air France",
    "TotalEnergies",
    "EDF",
    "Veolia",
    "Orange",
    "SFR",
    "Bouygues",
    "La Poste",
    "Amazon.fr",
    "Fnac",
    "Darty",
    "Deliveroo",
];

/// Description templates by operation type and side, in the seed's wording;
/// `{m}` is the merchant.
fn templates(operation_type: &str, debit: bool) -> &'static [&'static str] {
    match (operation_type, debit) {
        ("payment", true) => &["Card expense at {m}", "Purchase at {m}", "Online payment"],
        ("payment", false) => &["Receipt from {m}"],
        ("direct_debit", true) => &["Direct debit", "Subscription to {m}", "Invoice from {m}"],
        ("direct_debit", false) => &["Refund from {m}"],
        ("transfer", true) => &["Outgoing transfer"],
        ("transfer", false) => &["Incoming transfer"],
        (_, true) => &["Card expense at {m}"],
        (_, false) => &["Refund from {m}", "Receipt from {m}"],
    }
}

/// The kinds of malformed record `--invalid-ratio` produces, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    BadJson,
    MissingField,
    BadAmount,
    BadSide,
    BadTimestamp,
}

pub const INVALID_KINDS: [InvalidKind; 5] = [
    InvalidKind::BadJson,
    InvalidKind::MissingField,
    InvalidKind::BadAmount,
    InvalidKind::BadSide,
    InvalidKind::BadTimestamp,
];

/// One record to send: the key (the source id) and the JSON value.
#[derive(Debug, Clone)]
pub struct ProducedRecord {
    pub key: String,
    pub value: Vec<u8>,
    pub invalid: Option<InvalidKind>,
}

/// A seedable generator of transaction events.
pub struct TransactionGenerator {
    rng: SmallRng,
    invalid_ratio: f64,
    invalid_turn: usize,
}

impl TransactionGenerator {
    pub fn new(seed: u64, invalid_ratio: f64) -> Self {
        TransactionGenerator { rng: SmallRng::seed_from_u64(seed), invalid_ratio, invalid_turn: 0 }
    }

    /// A valid event as a JSON object, with a fresh UUID id.
    pub fn valid_event(&mut self) -> serde_json::Value {
        let rng = &mut self.rng;
        let id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
        let operation_type = ["payment", "direct_debit", "transfer", "refund"][rng.random_range(0..4)];
        // The seed file is about two-thirds debits; refunds are credits.
        let debit = operation_type != "refund" && rng.random_bool(0.72);
        let merchant = MERCHANTS[rng.random_range(0..MERCHANTS.len())];
        let options = templates(operation_type, debit);
        let description = options[rng.random_range(0..options.len())].replace("{m}", merchant);
        let cents: i64 = if debit { -rng.random_range(100..200_000) } else { rng.random_range(100..500_000) };
        serde_json::json!({
            "id": id.to_string(),
            "description": description,
            "amount": cents as f64 / 100.0,
            "timestamp": Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
            "merchant": merchant,
            "operation_type": operation_type,
            "side": if debit { "debit" } else { "credit" },
        })
    }

    /// The next record: valid, or with probability `invalid_ratio` one of
    /// the malformed kinds, taken in turn so that every kind occurs.
    pub fn next_record(&mut self) -> ProducedRecord {
        let mut event = self.valid_event();
        let key = event["id"].as_str().unwrap_or_default().to_string();
        if !self.rng.random_bool(self.invalid_ratio) {
            return ProducedRecord { key, value: event.to_string().into_bytes(), invalid: None };
        }
        let kind = INVALID_KINDS[self.invalid_turn % INVALID_KINDS.len()];
        self.invalid_turn += 1;
        let value = match kind {
            InvalidKind::BadJson => {
                let text = event.to_string();
                text.as_bytes()[..text.len() / 2].to_vec()
            }
            InvalidKind::MissingField => {
                let field = ["description", "amount", "timestamp", "side"][self.rng.random_range(0..4)];
                event.as_object_mut().map(|object| object.remove(field));
                event.to_string().into_bytes()
            }
            InvalidKind::BadAmount => {
                event["amount"] = serde_json::json!(["abc", "12,5.3", "1.234", "1e99"][self.rng.random_range(0..4)]);
                event.to_string().into_bytes()
            }
            InvalidKind::BadSide => {
                event["side"] = serde_json::json!("sideways");
                event.to_string().into_bytes()
            }
            InvalidKind::BadTimestamp => {
                event["timestamp"] = serde_json::json!("not-a-date");
                event.to_string().into_bytes()
            }
        };
        ProducedRecord { key, value, invalid: Some(kind) }
    }
}

/// Reads a transactions CSV into events, in file order, keeping each row's
/// own id as the key. Rows are sent as text fields: the pipeline's rules, not
/// the producer, decide whether they are valid.
pub fn records_from_csv(path: &std::path::Path) -> anyhow::Result<Vec<ProducedRecord>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let delimiter = detect_delimiter(&bytes);
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).flexible(true).from_reader(&bytes[..]);
    let headers =
        reader.headers().map_err(|e| anyhow::anyhow!("{}: cannot read the header: {e}", path.display()))?.clone();
    let layout = CsvLayout::from_header(headers.iter()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let id_column = layout.headers.iter().position(|h| h.trim().eq_ignore_ascii_case("id")).unwrap_or(0);
    let mut records = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let fields: Vec<&str> = row.iter().collect();
        let mut value = layout.row_json(&fields);
        // Amounts are sent as JSON numbers when the text is one (the seed's
        // decimal comma becomes a dot), as a real producer would.
        if let Some(amount) = value.get("amount").and_then(|a| a.as_str()).map(|a| a.replace(',', "."))
            && let Ok(number) = amount.trim().parse::<f64>()
            && number.is_finite()
        {
            value["amount"] = serde_json::json!(number);
        }
        let key = fields.get(id_column).map(|id| id.trim().to_string()).unwrap_or_default();
        records.push(ProducedRecord { key, value: value.to_string().into_bytes(), invalid: None });
    }
    Ok(records)
}

/// What `txnflow produce` was asked to do.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Records per second for one steady producer, instead of the seed's two.
    pub rate: Option<f64>,
    /// Stop after this many records in all.
    pub count: Option<u64>,
    pub invalid_ratio: f64,
    pub from: Option<PathBuf>,
    pub seed: u64,
    /// Override of `kafka.topic`.
    pub topic: Option<String>,
    /// Give each record a new sampled W3C `traceparent` header.
    pub traceparent: bool,
    /// Each producer loop's format, in turn (the last one for the rest):
    /// plain JSON (None), or framed for the registry in a schema format.
    pub formats: Vec<Option<SchemaFormat>>,
    /// The registry subject of `format`'s schema (default `<topic>-value`).
    pub subject: Option<String>,
}

/// How records are written: as they are, or framed for a registry schema.
enum Writing {
    Json,
    Framed { id: u32, schema: EventSchema },
}

impl Writing {
    /// Registers the repository's schema in `format` under `subject`.
    async fn framed(registry: &SchemaRegistryConfig, format: SchemaFormat, subject: &str) -> anyhow::Result<Writing> {
        let registry = SchemaRegistry::new(registry)?
            .ok_or_else(|| anyhow::anyhow!("--format {} needs schema_registry.url", format.as_str()))?;
        let text = transaction_schema_text(format);
        let id = registry.register(subject, format, text).await?;
        let schema = EventSchema::parse(format, text).map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!(subject, schema_id = id, format = format.as_str(), "schema registered");
        Ok(Writing::Framed { id, schema })
    }

    /// The record's value as written. A malformed record (`--invalid-ratio`)
    /// goes as it is: it has no event to frame, and stays invalid.
    fn value(&self, record: ProducedRecord) -> ProducedRecord {
        let Writing::Framed { id, schema } = self else { return record };
        let framed = serde_json::from_slice::<serde_json::Value>(&record.value)
            .ok()
            .filter(|_| record.invalid.is_none())
            .and_then(|event| schema.frame(*id, &event).ok());
        match framed {
            Some(value) => ProducedRecord { value, ..record },
            None => record,
        }
    }
}

/// Counters shared by the producer loops.
#[derive(Default)]
struct Tally {
    queued: AtomicU64,
    delivered: AtomicU64,
    invalid: AtomicU64,
    failed: AtomicU64,
}

/// Runs the producers until `count` records are sent, the file is replayed,
/// or Ctrl-C. Returns the number of records the broker acknowledged.
pub async fn run(kafka: &KafkaConfig, registry: &SchemaRegistryConfig, options: ProduceOptions) -> anyhow::Result<u64> {
    let producer = crate::kafka::producer(kafka)?;
    let topic = options.topic.clone().unwrap_or_else(|| kafka.topic.clone());
    let mut writings = Vec::new();
    for format in options.formats.iter().copied().chain(options.formats.is_empty().then_some(None)) {
        writings.push(Arc::new(match format {
            Some(format) => {
                let subject = options.subject.clone().unwrap_or_else(|| format!("{topic}-value"));
                Writing::framed(registry, format, &subject).await?
            }
            None => Writing::Json,
        }));
    }
    // The broker may not create topics on first use (auto.create.topics.enable=false).
    crate::kafka::ensure_topics(kafka, &[(topic.as_str(), kafka.partitions)]).await?;
    let tally = Arc::new(Tally::default());
    let limit = options.count.unwrap_or(u64::MAX);

    // Each producer loop: (records per tick as a range, tick period).
    let file_records = match &options.from {
        Some(path) => Some(Arc::new(records_from_csv(path)?)),
        None => None,
    };
    let loops: Vec<(std::ops::RangeInclusive<u64>, Duration)> = match options.rate {
        Some(rate) if rate > 0.0 => {
            let per_tick = (rate / 10.0).max(1.0);
            vec![(per_tick.floor() as u64..=per_tick.ceil() as u64, Duration::from_secs_f64(per_tick / rate))]
        }
        Some(_) => anyhow::bail!("--rate must be greater than 0"),
        None => vec![(1..=10, Duration::from_millis(500)), (5..=20, Duration::from_secs(1))],
    };
    let total = file_records.as_ref().map_or(limit, |records| limit.min(records.len() as u64));
    tracing::info!(
        topic,
        total = if total == u64::MAX { None } else { Some(total) },
        producers = loops.len(),
        "producing"
    );

    let next_file_row = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (per_tick, period)) in loops.into_iter().enumerate() {
        let (producer, topic, tally, file_records, next_file_row, writing) = (
            producer.clone(),
            topic.clone(),
            tally.clone(),
            file_records.clone(),
            next_file_row.clone(),
            writings[index.min(writings.len() - 1)].clone(),
        );
        let mut generator = TransactionGenerator::new(options.seed.wrapping_add(index as u64), options.invalid_ratio);
        let traced = options.traceparent;
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval(period);
            let mut tick_rng = SmallRng::seed_from_u64(index as u64);
            loop {
                ticker.tick().await;
                let mut sends = Vec::new();
                for _ in 0..tick_rng.random_range(per_tick.clone()) {
                    // Claim a slot first so that concurrent loops never exceed the total.
                    if tally.queued.fetch_add(1, Ordering::SeqCst) >= total {
                        break;
                    }
                    let record = match &file_records {
                        Some(records) => records[next_file_row.fetch_add(1, Ordering::SeqCst) as usize].clone(),
                        None => generator.next_record(),
                    };
                    if record.invalid.is_some() {
                        tally.invalid.fetch_add(1, Ordering::Relaxed);
                    }
                    let record = writing.value(record);
                    let traceparent = traced.then(|| new_traceparent(rand::random(), rand::random()));
                    sends.push(send(&producer, &topic, record, traceparent, &tally));
                }
                // A tick's records are in flight together: waiting for each
                // acknowledgement in turn would cap the rate at one per round trip.
                let sent = sends.len();
                futures_util::future::join_all(sends).await;
                if tally.queued.load(Ordering::SeqCst) >= total && sent == 0 {
                    return;
                }
            }
        });
    }

    let progress = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let delivered = tally.delivered.load(Ordering::Relaxed);
                tracing::info!(
                    delivered,
                    invalid = tally.invalid.load(Ordering::Relaxed),
                    failed = tally.failed.load(Ordering::Relaxed),
                    rate = format!("{:.0}/s", delivered as f64 / started.elapsed().as_secs_f64()),
                    "producing"
                );
            }
        })
    };
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); tasks.abort_all(); }
    }
    progress.abort();
    let delivered = tally.delivered.load(Ordering::SeqCst);
    let failed = tally.failed.load(Ordering::SeqCst);
    tracing::info!(delivered, invalid = tally.invalid.load(Ordering::SeqCst), failed, "done");
    if failed > 0 {
        anyhow::bail!("{failed} record(s) were not acknowledged by the broker");
    }
    Ok(delivered)
}

/// Sends one record and waits for the broker's acknowledgement.
async fn send(
    producer: &crate::kafka::Producer,
    topic: &str,
    record: ProducedRecord,
    traceparent: Option<String>,
    tally: &Tally,
) {
    let mut headers = OwnedHeaders::new().insert(Header { key: "producer", value: Some(crate::SERVICE) });
    if let Some(traceparent) = &traceparent {
        headers = headers.insert(Header { key: TRACEPARENT, value: Some(traceparent) });
    }
    let message = FutureRecord::to(topic).key(&record.key).payload(&record.value).headers(headers);
    match producer.send(message, Duration::from_secs(30)).await {
        Ok(_) => {
            tally.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Err((error, _)) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, key = record.key, "send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::parse_event;

    #[test]
    fn generated_events_are_valid_and_realistic() {
        let mut generator = TransactionGenerator::new(1, 0.0);
        for _ in 0..500 {
            let record = generator.next_record();
            let transaction = parse_event(&record.value).unwrap();
            assert_eq!(transaction.id.to_string(), record.key, "a UUID id is kept as is");
            assert_eq!(transaction.amount.cents() < 0, transaction.side.as_str() == "debit", "debits are negative");
            assert!(["payment", "direct_debit", "transfer", "refund"].contains(&transaction.operation_type.as_str()));
            assert!(MERCHANTS.contains(&transaction.merchant.as_deref().unwrap()));
        }
    }

    #[test]
    fn invalid_records_are_rejected_and_every_kind_occurs() {
        let mut generator = TransactionGenerator::new(2, 1.0);
        let mut kinds = Vec::new();
        for _ in 0..50 {
            let record = generator.next_record();
            assert!(parse_event(&record.value).is_err(), "{:?}", String::from_utf8_lossy(&record.value));
            kinds.push(record.invalid.unwrap());
        }
        for kind in INVALID_KINDS {
            assert!(kinds.contains(&kind), "{kind:?} never produced");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_records() {
        let ids = |seed| {
            let mut generator = TransactionGenerator::new(seed, 0.3);
            (0..20).map(|_| generator.next_record().key).collect::<Vec<_>>()
        };
        assert_eq!(ids(5), ids(5));
        assert_ne!(ids(5), ids(6));
    }
}
