//! OpenTelemetry traces over OTLP/HTTP, against a receiver the test starts
//! (`otlp_receiver`): which spans arrive, with which parents, links and
//! attributes; what sampling exports; and that a collector that is gone
//! costs no record.

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::helpers::{ChildGuard, free_port, txnflow};
use crate::otlp_receiver::Receiver;
use crate::scenario::{Scenario, ids_of, invalid_events, valid_events};

/// The spans a receiver kept, as the tests read them.
trait Spans {
    fn spans(&self) -> Vec<ReceivedSpan>;
    async fn wait_for(&self, limit: Duration, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan>;
}

impl Spans for Receiver {
    /// Every span received so far.
    fn spans(&self) -> Vec<ReceivedSpan> {
        let requests = self.requests.lock().unwrap();
        let mut spans = Vec::new();
        for request in requests.iter() {
            for resource_spans in &request.resource_spans {
                let resource = resource_spans.resource.iter().flat_map(|r| &r.attributes);
                let service = attributes(resource).remove("service.name").unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push(ReceivedSpan {
                            service: service.clone(),
                            name: span.name.clone(),
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            trace_state: span.trace_state.clone(),
                            kind: span.kind,
                            start: span.start_time_unix_nano,
                            end: span.end_time_unix_nano,
                            attributes: attributes(&span.attributes),
                            links: span.links.iter().map(|link| (hex(&link.trace_id), hex(&link.span_id))).collect(),
                        });
                    }
                }
            }
        }
        spans
    }

    /// Waits up to `limit` for the spans received to satisfy `done`.
    async fn wait_for(&self, limit: Duration, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) || std::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A span as the receiver decoded it; ids in lowercase hex, attribute
/// values rendered as text.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    trace_state: String,
    kind: i32,
    /// Start and end, in nanoseconds since the epoch.
    start: u64,
    end: u64,
    attributes: BTreeMap<String, String>,
    links: Vec<(String, String)>,
}

impl ReceivedSpan {
    fn attribute(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// OTLP's span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

/// The spans called `name`.
fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> std::vec::IntoIter<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect::<Vec<_>>().into_iter()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes<'a>(
    pairs: impl IntoIterator<Item = &'a opentelemetry_proto::tonic::common::v1::KeyValue>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// With `tracing.otlp_endpoint` set, the flushes' spans reach the receiver
/// under `service.name` txnflow, and the metric counts each one exported.
/// With the receiver stopped during a load, every record is still stored
/// and committed, none is dead-lettered, and the spans that could not be
/// exported are counted as dropped.
#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_and_a_missing_collector_costs_no_record() {
    let receiver = Receiver::listen(true);
    let scenario = Scenario::new("tracing").await;
    let url = receiver.url();
    let service = scenario
        .start_service(&[("TXNFLOW__TRACING__OTLP_ENDPOINT", url.as_str()), ("TXNFLOW__BUFFER__MAX_RECORDS", "100")])
        .await;
    assert!(service.wait_assigned(Duration::from_secs(60)).await, "{}", service.log_tail());
    let deadline = Duration::from_secs(120);

    let ends = Scenario::end_offsets(&scenario.produce(&valid_events(71, 300)).await);
    assert_eq!(scenario.wait_committed(&ends, deadline).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 300);
    // The batch processor exports every 5 s: wait for the flushes of the
    // 300 records, then until what it counts as exported has all arrived.
    let flushed = |spans: &[ReceivedSpan]| -> usize {
        named(spans, "flush").map(|f| f.attribute("messaging.batch.message_count").parse::<usize>().unwrap()).sum()
    };
    receiver.wait_for(deadline, |spans| flushed(spans) == 300).await;
    let exported = "txnflow_trace_spans_total{outcome=\"exported\"}";
    let mut arrived = false;
    for _ in 0..300 {
        let spans = receiver.span_count();
        if spans > 0 && service.metric(exported).await == spans as f64 {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(arrived, "spans arrive at the receiver\n{}", service.log_tail());
    let spans = receiver.spans();
    assert_eq!(service.metric(exported).await, spans.len() as f64, "every span counted as exported arrived");
    assert!(spans.iter().all(|span| span.service == "txnflow"), "service.name: {spans:?}");
    assert_eq!(flushed(&spans), 300, "the flushes of the 300 records");
    assert_eq!(service.metric("txnflow_trace_spans_total{outcome=\"dropped_export_failed\"}").await, 0.0);
    assert_eq!(service.metric("txnflow_trace_spans_total{outcome=\"dropped_queue_full\"}").await, 0.0);

    // The collector stops during a load of 3,000 more, which a slow ML API
    // (300 ms a call) keeps in flight for seconds: the records are stored
    // and committed as before.
    scenario.set_faults(serde_json::json!({"latency_ms": 300})).await;
    let events = valid_events(72, 3000);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    let under_way = scenario.wait_for(deadline, |s| s.predictions().len() >= 800).await;
    assert!(under_way, "the load gets under way\n{}", service.log_tail());
    receiver.stop();
    let received_at_stop = receiver.span_count();
    let stored_at_stop = scenario.count("SELECT count(*) FROM predictions") - 300;
    assert_eq!(scenario.wait_committed(&ends, deadline).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 3300);
    assert_eq!(scenario.transaction_ids().len(), 3300);
    assert_eq!(scenario.count("SELECT count(*) FROM dead_letters"), 0);
    let predicted = "txnflow_records_total{outcome=\"predicted\",source=\"kafka\"}";
    assert_eq!(service.metric(predicted).await, 3300.0, "each record predicted once");
    println!("the collector stopped with {stored_at_stop} of the 3,000 records stored");
    let counted = failed_exports(&service).await;
    assert!(counted > 0.0, "the spans the receiver did not take are counted\n{}", service.log_tail());
    assert_eq!(receiver.span_count(), received_at_stop, "nothing arrives once the receiver is gone");
}

/// The spans counted as `dropped_export_failed`, once there are any (or
/// 0 after 30 s).
async fn failed_exports(service: &crate::scenario::Service) -> f64 {
    let series = "txnflow_trace_spans_total{outcome=\"dropped_export_failed\"}";
    for _ in 0..300 {
        let counted = service.metric(series).await;
        if counted > 0.0 {
            return counted;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    0.0
}

/// A collector that answers each export only after 2 s, against an export
/// timeout of 200 ms: no export succeeds, every record is stored,
/// predicted once and committed, and the spans are counted as dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_collector_costs_no_record() {
    let receiver = Receiver::listen_slowly(false, Duration::from_secs(2));
    let scenario = Scenario::new("trace-slow").await;
    let url = receiver.url();
    let service = scenario
        .start_service(&[
            ("TXNFLOW__TRACING__OTLP_ENDPOINT", url.as_str()),
            ("TXNFLOW__TRACING__EXPORT_TIMEOUT_MS", "200"),
            ("TXNFLOW__BUFFER__MAX_RECORDS", "100"),
        ])
        .await;
    assert!(service.wait_assigned(Duration::from_secs(60)).await, "{}", service.log_tail());
    let events = valid_events(73, 2000);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.transaction_ids(), ids_of(&events));
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 2000);
    let predicted = "txnflow_records_total{outcome=\"predicted\",source=\"kafka\"}";
    assert_eq!(service.metric(predicted).await, 2000.0, "each record predicted once");
    let counted = failed_exports(&service).await;
    assert!(counted > 0.0, "the spans the collector did not take in time are counted\n{}", service.log_tail());
    assert_eq!(service.metric("txnflow_trace_spans_total{outcome=\"exported\"}").await, 0.0);
    receiver.stop();
}

/// A record's W3C `traceparent` header stays with it: each invalid record
/// reaches the DLQ with its own `traceparent` as the last header, exactly;
/// a malformed one is dropped rather than copied; valid records are stored.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_keep_the_records_traceparent() {
    let scenario = Scenario::new("traceparent").await;
    let valid = valid_events(81, 200);
    let invalid = invalid_events(82, 15);
    let traceparent = |n: usize| format!("00-{:032x}-{:016x}-01", 0x4bf9_0000 + n, 0x00f0_0000 + n);
    let mut events = valid.clone();
    events.extend(invalid.iter().cloned());
    // Valid records and 10 invalid ones carry a well-formed header; the last
    // 5 invalid ones a malformed one.
    let headers: Vec<Option<String>> =
        (0..events.len()).map(|n| Some(if n < 210 { traceparent(n) } else { format!("00-not-a-trace-{n}") })).collect();
    let service = scenario.start_service(&[]).await;
    assert!(service.wait_assigned(Duration::from_secs(60)).await, "{}", service.log_tail());
    let ends = Scenario::end_offsets(&scenario.produce_with_traceparents(&events, &headers).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.transaction_ids(), ids_of(&valid), "the valid records are stored");

    let letters = scenario.dlq(15);
    let got: BTreeMap<String, Option<String>> = letters
        .iter()
        .map(|letter| {
            let last = letter.headers.last().filter(|(name, _)| name == "traceparent").map(|(_, v)| v.clone());
            let anywhere = letter.headers.iter().filter(|(name, _)| name == "traceparent").count();
            assert!(anywhere <= 1, "one traceparent at most: {:?}", letter.headers);
            (letter.key.clone(), last)
        })
        .collect();
    let expected: BTreeMap<String, Option<String>> =
        invalid.iter().enumerate().map(|(i, (key, _))| (key.clone(), (i < 10).then(|| traceparent(200 + i)))).collect();
    assert_eq!(got, expected, "each dead letter's traceparent");
}

/// `txnflow ml-api` on a free port, exporting its spans to `otlp` as
/// service `ml-api`: the process (killed on drop) and its base URL.
async fn traced_ml_api(otlp: &str) -> (ChildGuard, String) {
    let port = free_port();
    let child = ChildGuard(
        txnflow()
            .args(["ml-api", "--listen", &format!("127.0.0.1:{port}")])
            .env("TXNFLOW__TRACING__OTLP_ENDPOINT", otlp)
            .env("OTEL_SERVICE_NAME", "ml-api")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{base}/health")).await.is_ok() {
            return (child, base);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the ML API did not start");
}

/// Test `n`'s producer span: `traceparent` trace and parent ids.
fn producer_ids(n: usize) -> (String, String) {
    (format!("{:032x}", 0x7a3c_0000_0000_0000_0000_0000_0000_0000u128 + n as u128), format!("{:016x}", 0x0b00 + n))
}

/// 200 valid records and 10 invalid ones, each with its own producer's
/// `traceparent`, through a service and an ML API that both export to the
/// receiver. Every record's spans hang where they should:
/// - its `read` (consumer kind, partition and offset) under the producer's
///   span, and its `buffer wait` under the read;
/// - exactly one `flush` links to each valid record's read; each flush's
///   ML API calls (`POST`, client) and its write (`INSERT transactions`)
///   are its children, with the HTTP and database attributes;
/// - the ML API's `POST /predict` (server) is the child of each call: the
///   request carried the call's `traceparent`, in the flush's trace;
/// - each invalid record's DLQ `send` (producer) is the child of its read,
///   and its dead letter's last header is its `traceparent`;
/// - every span's parent was received too, but for the reads' (the
///   producers'): no span hangs under one that is never exported.
#[tokio::test(flavor = "multi_thread")]
async fn each_records_spans_hang_under_its_traceparent_and_its_flush() {
    let receiver = Receiver::listen(true);
    let scenario = Scenario::new("trace-tree").await;
    let otlp = receiver.url();
    let (_ml_api, ml_api_url) = traced_ml_api(&otlp).await;
    let service = scenario
        .start_service(&[
            ("TXNFLOW__TRACING__OTLP_ENDPOINT", otlp.as_str()),
            ("TXNFLOW__PREDICT__URL", ml_api_url.as_str()),
            ("TXNFLOW__BUFFER__MAX_RECORDS", "50"),
            ("TXNFLOW__LOG__FORMAT", "json"),
            ("TXNFLOW__LOG__LEVEL", "info,txnflow::actors::db_writer=debug"),
        ])
        .await;
    assert!(service.wait_assigned(Duration::from_secs(60)).await, "{}", service.log_tail());
    let valid = valid_events(91, 200);
    let invalid = invalid_events(92, 10);
    let mut events = valid.clone();
    events.extend(invalid.iter().cloned());
    let traceparents: Vec<Option<String>> = (0..events.len())
        .map(|n| {
            let (trace, parent) = producer_ids(n);
            Some(format!("00-{trace}-{parent}-01"))
        })
        .collect();
    // Every fourth record also carries a tracestate, which its read keeps.
    let tracestate = |n: usize| n.is_multiple_of(4).then(|| format!("vendor=r{n},other=x"));
    let headers: Vec<Vec<(&str, String)>> = traceparents
        .iter()
        .enumerate()
        .map(|(n, traceparent)| {
            let mut headers = vec![("traceparent", traceparent.clone().unwrap())];
            headers.extend(tracestate(n).map(|state| ("tracestate", state)));
            headers
        })
        .collect();
    let sent = scenario.produce_with_headers(&events, &headers).await;
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.transaction_ids(), ids_of(&valid));

    let read_name = format!("read {}", scenario.topic);
    let send_name = format!("send {}", scenario.dlq_topic);
    let commit_name = format!("commit {}", scenario.topic);
    let spans = receiver
        .wait_for(Duration::from_secs(60), |spans| {
            let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
            let calls = spans.iter().filter(|s| s.name == "POST" && s.service == "txnflow").count();
            let linked: usize = spans.iter().filter(|s| s.name == "flush").map(|s| s.links.len()).sum();
            count(&read_name) == 210
                && count("buffer wait") == 200
                && count(&send_name) == 10
                && linked == 200
                && calls > 0
                && count("POST /predict") == calls
                && count("INSERT transactions") == count("flush")
                && count(&commit_name) > 0
        })
        .await;
    let by_id: BTreeMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let named = |name: &str| named(&spans, name);

    // Every record's read, under its producer's span.
    let mut reads = BTreeMap::new();
    for (n, record) in sent.iter().enumerate() {
        let (trace, parent) = producer_ids(n);
        let found: Vec<&ReceivedSpan> = named(&read_name).filter(|s| s.trace_id == trace).collect();
        assert_eq!(found.len(), 1, "record {n}: one read span\n{}", service.log_tail());
        let read = found[0];
        assert_eq!((read.parent.as_str(), read.kind, read.service.as_str()), (parent.as_str(), CONSUMER, "txnflow"));
        assert_eq!(read.attribute("messaging.system"), "kafka");
        assert_eq!(read.attribute("messaging.operation.type"), "receive");
        assert_eq!(read.attribute("messaging.destination.name"), scenario.topic);
        assert_eq!(read.attribute("messaging.destination.partition.id"), record.partition.to_string());
        assert_eq!(read.attribute("messaging.kafka.offset"), record.offset.to_string());
        assert_eq!(read.attribute("error.type"), if n < 200 { "" } else { "invalid" }, "record {n}");
        assert_eq!(read.trace_state, tracestate(n).unwrap_or_default(), "record {n}: its tracestate");
        reads.insert(n, read);
    }

    // Valid records: a buffer wait under the read, one flush linking to it.
    let flushes: Vec<&ReceivedSpan> = named("flush").collect();
    for (n, read) in reads.iter().filter(|(n, _)| **n < 200) {
        let waits: Vec<&ReceivedSpan> = named("buffer wait").filter(|s| s.trace_id == read.trace_id).collect();
        assert_eq!(waits.len(), 1, "record {n}: one buffer wait");
        assert_eq!(waits[0].parent, read.span_id, "record {n}: the wait hangs under the read");
        let link = (read.trace_id.clone(), read.span_id.clone());
        assert_eq!(flushes.iter().filter(|f| f.links.contains(&link)).count(), 1, "record {n}: one flush links to it");
    }

    // Each flush: its ML API calls and its write are its children.
    let mut flushed = 0;
    for flush in &flushes {
        assert_eq!(flush.parent, "", "a flush is the root of its own trace");
        let size: usize = flush.attribute("messaging.batch.message_count").parse().unwrap();
        assert_eq!(size, flush.links.len(), "a flush links to each of its records");
        flushed += size;
        let children = |name: &'static str| {
            spans.iter().filter(move |s| s.name == name && s.parent == flush.span_id && s.trace_id == flush.trace_id)
        };
        let calls: Vec<&ReceivedSpan> = children("POST").collect();
        assert!(!calls.is_empty(), "flush {}: its ML API calls", flush.attribute("txnflow.flush.id"));
        let mut asked = 0;
        for call in &calls {
            assert_eq!(call.kind, CLIENT);
            assert_eq!(call.attribute("http.request.method"), "POST");
            assert_eq!(call.attribute("http.response.status_code"), "200");
            assert_eq!(call.attribute("url.full"), format!("{ml_api_url}/predict"));
            assert_eq!(call.attribute("http.request.resend_count"), "0");
            assert_eq!(call.attribute("txnflow.breaker.state"), "closed");
            asked += call.attribute("txnflow.predict.batch_size").parse::<usize>().unwrap();
            // The ML API joined the call's trace: its request span is the call's child.
            let served: Vec<&ReceivedSpan> =
                named("POST /predict").filter(|s| s.trace_id == call.trace_id && s.parent == call.span_id).collect();
            assert_eq!(served.len(), 1, "the ML API's span of this call");
            assert_eq!((served[0].service.as_str(), served[0].kind), ("ml-api", SERVER));
            assert_eq!(served[0].attribute("http.response.status_code"), "200");
        }
        assert_eq!(asked, size, "the calls asked for each record of the flush once");
        let writes: Vec<&ReceivedSpan> = children("INSERT transactions").collect();
        assert_eq!(writes.len(), 1, "one write of the flush");
        assert_eq!(writes[0].kind, CLIENT);
        assert_eq!(writes[0].attribute("db.system.name"), "postgresql");
        assert_eq!(writes[0].attribute("db.collection.name"), "transactions");
        assert_eq!(writes[0].attribute("db.operation.batch.size"), size.to_string());
        assert_eq!(writes[0].attribute("txnflow.write.outcome"), "ok");
    }
    assert_eq!(flushed, 200, "the flushes hold the 200 valid records");
    // A flush's log lines carry its trace id, to go from a log to its trace.
    let logged: BTreeMap<String, String> = std::fs::read_to_string(&service.log)
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "flush durable")
        .map(|line| (line["flush_id"].to_string(), line["trace_id"].as_str().unwrap_or_default().to_string()))
        .collect();
    let traced: BTreeMap<String, String> =
        flushes.iter().map(|f| (f.attribute("txnflow.flush.id").to_string(), f.trace_id.clone())).collect();
    assert_eq!(logged, traced, "each flush's log line names its trace");
    assert_eq!(named("POST /predict").count(), named("POST").filter(|s| s.service == "txnflow").count());

    // Invalid records: their DLQ send under the read, and their header kept.
    for (n, read) in reads.iter().filter(|(n, _)| **n >= 200) {
        let sends: Vec<&ReceivedSpan> = named(&send_name).filter(|s| s.trace_id == read.trace_id).collect();
        assert_eq!(sends.len(), 1, "record {n}: one DLQ send");
        assert_eq!((sends[0].parent.as_str(), sends[0].kind), (read.span_id.as_str(), PRODUCER));
        assert_eq!(sends[0].attribute("messaging.destination.name"), scenario.dlq_topic);
        assert_eq!(sends[0].attribute("error.type"), "invalid");
        assert_eq!(sends[0].attribute("txnflow.dlq.outcome"), "published");
        assert_eq!(named("buffer wait").filter(|s| s.trace_id == read.trace_id).count(), 0);
    }
    let letters = scenario.dlq(10);
    let got: BTreeMap<String, Option<String>> =
        letters.iter().map(|l| (l.key.clone(), l.headers.last().map(|(_, value)| value.clone()))).collect();
    let expected: BTreeMap<String, Option<String>> =
        invalid.iter().enumerate().map(|(i, (key, _))| (key.clone(), traceparents[200 + i].clone())).collect();
    assert_eq!(got, expected, "each dead letter's last header is its record's traceparent");

    println!("{}", follow(&spans, reads[&0], &flushes));

    // Commits are traces of their own; nothing hangs under a span never sent.
    // How many commits there were depends on timing; that they are traced does not.
    let commits: Vec<&ReceivedSpan> = named(&commit_name).collect();
    assert!(!commits.is_empty(), "the commits are traced");
    for commit in commits {
        assert_eq!((commit.parent.as_str(), commit.kind), ("", CLIENT));
        assert_eq!(commit.attribute("messaging.operation.type"), "settle");
        assert_eq!(commit.attribute("messaging.consumer.group.name"), scenario.group());
        let partitions: i32 = commit.attribute("txnflow.commit.partitions").parse().unwrap();
        assert!((1..=3).contains(&partitions), "{commit:?}");
    }
    for span in spans.iter().filter(|s| !s.parent.is_empty() && s.name != read_name) {
        assert!(by_id.contains_key(span.parent.as_str()), "the parent of {span:?} was exported");
    }
}

/// One record's spans as a tree, with when each started (after the read)
/// and how long it took: its own trace, then the flush that served it.
fn follow(spans: &[ReceivedSpan], read: &ReceivedSpan, flushes: &[&ReceivedSpan]) -> String {
    fn tree(spans: &[ReceivedSpan], span: &ReceivedSpan, origin: u64, depth: usize, out: &mut String) {
        let keys = [
            "messaging.destination.partition.id",
            "messaging.kafka.offset",
            "http.response.status_code",
            "txnflow.predict.batch_size",
            "db.operation.batch.size",
            "txnflow.write.outcome",
            "messaging.batch.message_count",
        ];
        let shown: Vec<String> = keys
            .iter()
            .filter(|k| span.attributes.contains_key(**k))
            .map(|k| format!("{k}={}", span.attribute(k)))
            .collect();
        out.push_str(&format!(
            "{:>9.3} ms {:>8.3} ms  {}{} [{}] {}\n",
            (span.start as f64 - origin as f64) / 1e6,
            (span.end - span.start) as f64 / 1e6,
            "  ".repeat(depth),
            span.name,
            span.service,
            shown.join(" ")
        ));
        let mut children: Vec<&ReceivedSpan> =
            spans.iter().filter(|s| s.parent == span.span_id && s.trace_id == span.trace_id).collect();
        children.sort_by_key(|s| s.start);
        for child in children {
            tree(spans, child, origin, depth + 1, out);
        }
    }
    let mut out = format!("trace {} (parent {}, the producer's)\n", read.trace_id, read.parent);
    tree(spans, read, read.start, 0, &mut out);
    let link = (read.trace_id.clone(), read.span_id.clone());
    for flush in flushes.iter().filter(|f| f.links.contains(&link)) {
        out.push_str(&format!("linked from trace {}\n", flush.trace_id));
        tree(spans, flush, read.start, 0, &mut out);
    }
    out
}

/// Whether a trace is sampled at `ratio`: the trace-id rule of
/// OpenTelemetry's `TraceIdRatioBased` sampler, which txnflow applies to
/// every trace (its lower 64 bits, shifted right by one, under
/// `ratio × 2⁶³`).
fn sampled_at(ratio: f64, trace_id: u128) -> bool {
    ((trace_id as u64) >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

/// `sample_ratio = 0.1`: of 1,000 records whose producers sampled them
/// (trace ids from a fixed seed), exactly those whose trace id the ratio
/// samples are traced, which is 10% within a binomial bound; none of 100
/// records whose producer did not sample them is, though the ratio would
/// take each of their ids; of 1,000 records without a header, 10% within
/// the bound start a trace, each with an id the ratio samples; and the
/// flushes of the traced records are traced, linking to them only.
#[tokio::test(flavor = "multi_thread")]
async fn a_sample_ratio_traces_its_share_of_records_by_trace_id() {
    use rand::{Rng, SeedableRng};
    let receiver = Receiver::listen(true);
    let scenario = Scenario::new("trace-ratio").await;
    let otlp = receiver.url();
    let service = scenario
        .start_service(&[
            ("TXNFLOW__TRACING__OTLP_ENDPOINT", otlp.as_str()),
            ("TXNFLOW__TRACING__SAMPLE_RATIO", "0.1"),
            ("TXNFLOW__BUFFER__MAX_RECORDS", "200"),
        ])
        .await;
    assert!(service.wait_assigned(Duration::from_secs(60)).await, "{}", service.log_tail());
    let events = valid_events(93, 2100);
    let mut seeded = rand::rngs::StdRng::seed_from_u64(2026);
    let trace_ids: Vec<u128> =
        (0..1000).map(|_| seeded.random::<u128>() | 1).chain((0..100).map(|n| (n + 1) << 64)).collect();
    let traceparents: Vec<Option<String>> = trace_ids
        .iter()
        .enumerate()
        .map(|(n, id)| Some(format!("00-{id:032x}-{:016x}-{}", n + 1, if n < 1000 { "01" } else { "00" })))
        .chain(std::iter::repeat_n(None, 1000))
        .collect();
    let expected: std::collections::BTreeSet<String> =
        trace_ids[..1000].iter().filter(|id| sampled_at(0.1, **id)).map(|id| format!("{id:032x}")).collect();
    // 1,000 draws at p = 0.1: mean 100, standard deviation 9.5; the seed's
    // count must lie within four of them.
    assert!((62..=138).contains(&expected.len()), "the seed gives {} sampled traces", expected.len());
    assert!(trace_ids[1000..].iter().all(|id| sampled_at(0.1, *id)), "the ratio alone would take the unsampled ones");

    let ends = Scenario::end_offsets(&scenario.produce_with_traceparents(&events, &traceparents).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.transaction_ids(), ids_of(&events));
    let read_name = format!("read {}", scenario.topic);
    // A graceful stop exports every span still queued before the process
    // exits: what the receiver holds then is all there is.
    let mut service = service;
    let exit = service.signal("TERM", Duration::from_secs(60));
    assert!(exit.is_some_and(|status| status.success()), "a clean exit: {exit:?}");
    let spans = receiver.spans();
    let (headed, roots): (Vec<&ReceivedSpan>, Vec<&ReceivedSpan>) =
        named(&spans, &read_name).partition(|read| !read.parent.is_empty());
    let headed_traces: BTreeSet<String> = headed.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(headed_traces, expected, "exactly the reads of the sampled traces");
    assert_eq!(headed.len(), expected.len(), "one read per sampled record");
    // Records without a header: each trace a new one, sampled by its id.
    assert!((62..=138).contains(&roots.len()), "{} of 1,000 new traces sampled at 0.1", roots.len());
    for root in &roots {
        assert!(sampled_at(0.1, u128::from_str_radix(&root.trace_id, 16).unwrap()), "{root:?}");
    }
    let traced: BTreeSet<String> =
        headed_traces.iter().cloned().chain(roots.iter().map(|r| r.trace_id.clone())).collect();
    assert_eq!(traced.len(), expected.len() + roots.len(), "each read its own trace");
    let waits: BTreeSet<String> = named(&spans, "buffer wait").map(|s| s.trace_id.clone()).collect();
    assert_eq!(waits, traced, "exactly the traced records' buffer waits");
    let linked: BTreeSet<String> =
        named(&spans, "flush").flat_map(|f| f.links.iter().map(|(trace, _)| trace.clone())).collect();
    assert_eq!(linked, traced, "each traced record's flush is traced, and links to the traced records only");
    println!(
        "sample_ratio 0.1: {} of 1,000 sampled headers exported, 0 of 100 unsampled ones, {} of 1,000 records without one",
        expected.len(),
        roots.len()
    );
}

/// A batch run is one trace: its `batch run` span, a `file` span for each
/// of its two files under it, and under it too every flush of its 200
/// rows, each with its ML API calls and its write as children. Every span
/// the run exports is in that trace.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_run_is_one_trace_with_a_span_per_file_and_per_flush() {
    use crate::batch::{Folder, batch_with, seed_line, seed_rows};
    let receiver = Receiver::listen(true);
    let scenario = Scenario::new("trace-batch").await;
    let folder = Folder::new().await;
    let (header, rows) = seed_rows();
    let mut files = Vec::new();
    for (n, part) in rows[..200].chunks(100).enumerate() {
        let text: String =
            std::iter::once(header.clone()).chain(part.iter().map(seed_line)).map(|line| line + "\n").collect();
        files.push(folder.put(&format!("part-{n}.csv"), text.into_bytes()).await);
    }
    let run_id = format!("traced-{}", uuid::Uuid::new_v4().simple());
    let otlp = receiver.url();
    let output = batch_with(
        &scenario,
        &[&folder.uri(), "--run-id", &run_id],
        &[("TXNFLOW__TRACING__OTLP_ENDPOINT", otlp.as_str()), ("TXNFLOW__BUFFER__MAX_RECORDS", "60")],
    );
    assert!(output.status.success(), "{}", crate::helpers::stderr(&output));
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 200);

    // The process exported what it had before it exited.
    let spans = receiver.spans();
    let runs: Vec<&ReceivedSpan> = named(&spans, "batch run").collect();
    assert_eq!(runs.len(), 1, "one run span: {spans:?}");
    let run = runs[0];
    assert_eq!((run.parent.as_str(), run.attribute("txnflow.run.id")), ("", run_id.as_str()));
    assert!(spans.iter().all(|s| s.trace_id == run.trace_id), "every span is in the run's trace");
    let file_uris: BTreeSet<&str> = named(&spans, "file")
        .map(|file| {
            assert_eq!(file.parent, run.span_id, "a file hangs under its run");
            file.attribute("txnflow.file.uri")
        })
        .collect();
    assert_eq!(file_uris, files.iter().map(String::as_str).collect(), "a span per file");
    assert_eq!(named(&spans, "file").count(), 2);
    let mut flushed = 0;
    for flush in named(&spans, "flush") {
        assert_eq!(flush.parent, run.span_id, "a flush hangs under its run");
        assert!(flush.links.is_empty(), "CSV rows have no spans of their own to link to");
        let size: usize = flush.attribute("messaging.batch.message_count").parse().unwrap();
        flushed += size;
        let children = |name: &str| spans.iter().filter(|s| s.name == name && s.parent == flush.span_id).count();
        assert!(children("POST") >= 1, "the flush's ML API calls");
        assert_eq!(children("INSERT transactions"), 1, "the flush's write");
    }
    assert_eq!(flushed, 200, "the flushes hold the run's 200 rows");
}
