//! An OTLP/HTTP traces receiver on a free loopback port: a real HTTP/1.1
//! server that decodes each request's protobuf with the
//! `opentelemetry-proto` types. The tracing tests keep what it decodes;
//! the pipeline benchmark (which includes this file) only counts the spans.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Receiver {
    address: SocketAddr,
    /// Every request decoded, when the receiver keeps them.
    pub requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    spans: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
}

/// What one connection's thread shares with the receiver.
#[derive(Clone)]
struct Shared {
    requests: Option<Arc<Mutex<Vec<ExportTraceServiceRequest>>>>,
    spans: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
    /// How long each answer waits: a slow collector.
    delay: Duration,
}

impl Receiver {
    /// A receiver that keeps every request, or only counts the spans.
    pub fn listen(keep: bool) -> Receiver {
        Receiver::listen_slowly(keep, Duration::ZERO)
    }

    /// The same, answering each request only after `delay`.
    pub fn listen_slowly(keep: bool, delay: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let receiver = Receiver {
            address,
            requests: Arc::new(Mutex::new(Vec::new())),
            spans: Arc::new(AtomicUsize::new(0)),
            stopped: Arc::new(AtomicBool::new(false)),
        };
        let shared = Shared {
            requests: keep.then(|| receiver.requests.clone()),
            spans: receiver.spans.clone(),
            stopped: receiver.stopped.clone(),
            delay,
        };
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        receiver
    }

    /// The URL to export to (`tracing.otlp_endpoint`).
    pub fn url(&self) -> String {
        format!("http://{}/v1/traces", self.address)
    }

    /// Spans received so far.
    pub fn span_count(&self) -> usize {
        self.spans.load(Ordering::SeqCst)
    }

    /// Closes the port: later exports are refused.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.address);
    }
}

/// HTTP/1.1 requests on one connection, until it closes or the receiver stops.
fn serve(stream: TcpStream, shared: &Shared) {
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
        if reader.read_exact(&mut body).is_err() || shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf");
        let spans: usize =
            request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|scope| scope.spans.len()).sum();
        if let Some(requests) = &shared.requests {
            requests.lock().unwrap().push(request);
        }
        shared.spans.fetch_add(spans, Ordering::SeqCst);
        std::thread::sleep(shared.delay);
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
