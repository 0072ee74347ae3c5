//! OpenTelemetry traces over OTLP/HTTP, against a receiver the test starts:
//! a real HTTP server that decodes each request's protobuf with the
//! `opentelemetry-proto` types. The first step of tracing: spans are
//! exported and counted, and a collector that is gone costs no record.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::scenario::{Scenario, ids_of, invalid_events, valid_events};

/// An OTLP/HTTP traces receiver on a free loopback port, keeping every
/// request it decodes.
struct Receiver {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    stopped: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let (kept, stop) = (requests.clone(), stopped.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (kept, stop) = (kept.clone(), stop.clone());
                std::thread::spawn(move || serve(stream, &kept, &stop));
            }
        });
        Receiver { address, requests, stopped }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/traces", self.address)
    }

    /// Closes the port: later exports are refused.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.address);
    }

    /// The spans received so far: (service.name of their resource, span name).
    fn spans(&self) -> Vec<(String, String)> {
        let requests = self.requests.lock().unwrap();
        let mut spans = Vec::new();
        for request in requests.iter() {
            for resource_spans in &request.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                    .map(|v| match v {
                        Value::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.name.clone()));
                    }
                }
            }
        }
        spans
    }
}

/// HTTP/1.1 requests on one connection, until it closes or the receiver stops.
fn serve(stream: TcpStream, kept: &Mutex<Vec<ExportTraceServiceRequest>>, stop: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() || stop.load(Ordering::SeqCst) {
            return;
        }
        kept.lock().unwrap().push(ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf"));
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// With `tracing.otlp_endpoint` set, the flushes' spans reach the receiver
/// under `service.name` txnflow, and the metric counts each one exported.
/// With the receiver gone, every record is still stored and committed, and
/// the spans that could not be exported are counted as dropped.
#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_and_a_missing_collector_costs_no_record() {
    let receiver = Receiver::start();
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
    // The batch processor exports every 5 s; wait until what it counts as
    // exported has all arrived.
    let exported = "txnflow_trace_spans_total{outcome=\"exported\"}";
    let mut arrived = false;
    for _ in 0..300 {
        let spans = receiver.spans().len();
        if spans > 0 && service.metric(exported).await == spans as f64 {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(arrived, "spans arrive at the receiver\n{}", service.log_tail());
    let spans = receiver.spans();
    assert_eq!(service.metric(exported).await, spans.len() as f64, "every span counted as exported arrived");
    assert!(spans.iter().all(|(service, _)| service == "txnflow"), "service.name: {spans:?}");
    assert!(spans.iter().any(|(_, name)| name == "flush"), "flush spans: {spans:?}");
    assert_eq!(service.metric("txnflow_trace_spans_total{outcome=\"dropped_export_failed\"}").await, 0.0);
    assert_eq!(service.metric("txnflow_trace_spans_total{outcome=\"dropped_queue_full\"}").await, 0.0);

    // The collector gone: the records are stored and committed as before.
    receiver.stop();
    let before = spans.len();
    let mut events = valid_events(71, 300);
    events.extend(valid_events(72, 300));
    let ends = Scenario::end_offsets(&scenario.produce(&events[300..]).await);
    assert_eq!(scenario.wait_committed(&ends, deadline).await, ends, "{}", service.log_tail());
    assert_eq!(scenario.count("SELECT count(*) FROM predictions"), 600);
    assert_eq!(scenario.count("SELECT count(*) FROM dead_letters"), 0);
    let dropped = "txnflow_trace_spans_total{outcome=\"dropped_export_failed\"}";
    let mut counted = 0.0;
    for _ in 0..300 {
        counted = service.metric(dropped).await;
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted > 0.0, "the spans the receiver did not take are counted\n{}", service.log_tail());
    assert_eq!(receiver.spans().len(), before, "nothing arrives once the receiver is gone");
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
