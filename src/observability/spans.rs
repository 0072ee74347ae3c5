//! The pipeline's trace spans, built with the OpenTelemetry API once
//! tracing is on (see `telemetry`), each with an explicit parent:
//!
//! - a Kafka record's `read` span is the child of the producer's span that
//!   its `traceparent` header names, or the root of a new trace; the
//!   record's `buffer wait` and, if it is dead-lettered, its DLQ `send`
//!   span are children of `read`;
//! - a `flush` serves many records, so it links to each record's `read`
//!   span rather than having one parent; its ML API calls (`POST`) and
//!   its database writes (`INSERT transactions`) are its children, and each
//!   call carries the call span's `traceparent` to the ML API;
//! - a batch run is one trace: `batch run`, a `file` span per file, and the
//!   flushes of its rows under the run;
//! - each offset commit is a trace of its own.
//!
//! Spans are built directly rather than from `tracing`'s spans, so that a
//! record's spans have the record's trace as parent, whichever actor
//! thread builds them. With tracing off every function here returns at
//! once, and a record carries no span context.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::domain::trace_context::{TRACESTATE, parse_traceparent, sampled_at, valid_traceparent, valid_tracestate};

/// The tracer, and `tracing.sample_ratio`, set once tracing is configured.
static TRACER: OnceLock<(SdkTracer, f64)> = OnceLock::new();

/// Makes the pipeline's spans; called once, when tracing is configured.
pub(crate) fn install(tracer: SdkTracer, sample_ratio: f64) {
    let _ = TRACER.set((tracer, sample_ratio));
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get().map(|(tracer, _)| tracer)
}

/// A span that is recording (sampled), or none.
fn start(builder: SpanBuilder, parent: &Context) -> Option<Span> {
    let tracer = tracer()?;
    let span = builder.start_with_context(tracer, parent);
    span.is_recording().then_some(span)
}

/// A context whose active span is `parent` (a span of this process, or
/// the producer's from a header).
fn under(parent: &SpanContext) -> Context {
    Context::new().with_remote_span_context(parent.clone())
}

/// A context whose parent is the remote span a `traceparent` names, with
/// its `tracestate`; an empty one if the header is not well-formed.
fn remote(traceparent: &str, state: Option<TraceState>) -> Context {
    let Some(caller) = parse_traceparent(traceparent) else { return Context::new() };
    let flags = if caller.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let span = SpanContext::new(
        TraceId::from(caller.trace_id),
        SpanId::from(caller.parent_id),
        flags,
        true,
        state.unwrap_or_default(),
    );
    under(&span)
}

/// The W3C `traceparent` of a span, to send on with a request.
fn traceparent_header(span: &SpanContext) -> String {
    format!("00-{:032x}-{:016x}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8())
}

fn kafka() -> KeyValue {
    KeyValue::new("messaging.system", "kafka")
}

/// Where a record stands in tracing, carried with it through the pipeline.
#[derive(Debug, Clone, Default)]
pub struct RecordTrace {
    /// The record's `traceparent` header, if well-formed: its dead letter
    /// keeps it, so that a replay continues the same trace.
    pub traceparent: Option<String>,
    /// Its `read` span and when that ended, when its trace is sampled.
    read: Option<(SpanContext, SystemTime)>,
    /// The batch run whose row this is: a flush of the run's rows is the
    /// run's child.
    run: Option<SpanContext>,
}

impl RecordTrace {
    /// A CSV row of the run traced by `run`.
    pub fn of_run(run: &RunSpan) -> RecordTrace {
        RecordTrace { traceparent: None, read: None, run: run.context() }
    }

    /// The span the record's later spans hang under: its read, or its run.
    fn parent(&self) -> Option<&SpanContext> {
        self.read.as_ref().map(|(read, _)| read).or(self.run.as_ref())
    }
}

/// Where a Kafka record was read from.
#[derive(Debug, Clone, Copy)]
pub struct ReadAt<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub group: &'a str,
}

/// The `read` span of a record just read and checked (`rejected` names
/// why it is invalid), and what the record carries on. The producer's
/// `traceparent` (as `kafka::traceparent_of` kept it) is the
/// parent; a header that says "not sampled" is obeyed.
pub fn read(
    message: &impl rdkafka::message::Message,
    traceparent: Option<String>,
    at: ReadAt<'_>,
    started: SystemTime,
    rejected: Option<&str>,
) -> RecordTrace {
    use rdkafka::message::Headers;
    let header = |name: &str| message.headers().and_then(|headers| headers.iter().find(|h| h.key == name)?.value);
    let untraced = |traceparent| RecordTrace { traceparent, ..RecordTrace::default() };
    let Some((tracer, ratio)) = TRACER.get() else { return untraced(traceparent) };
    // Sampled or not is decided here, as the sampler would, before any span
    // is built: at a low ratio, most records cost no more than this.
    let producer = traceparent.as_deref().and_then(parse_traceparent);
    let trace_id = match producer {
        Some(producer) if !producer.sampled => return untraced(traceparent),
        Some(producer) => producer.trace_id,
        None => rand::random::<u128>().max(1),
    };
    if !sampled_at(*ratio, trace_id) {
        return untraced(traceparent);
    }
    let builder =
        tracer.span_builder(format!("read {}", at.topic)).with_kind(SpanKind::Consumer).with_start_time(started);
    let span = match traceparent.as_deref() {
        Some(traceparent) => {
            let state = header(TRACESTATE).and_then(valid_tracestate).and_then(|state| state.parse().ok());
            start(builder, &remote(traceparent, state))
        }
        None => crate::observability::telemetry::with_trace_id(trace_id, || start(builder, &Context::new())),
    };
    let Some(mut span) = span else { return untraced(traceparent) };
    span.set_attributes([
        kafka(),
        KeyValue::new("messaging.operation.type", "receive"),
        KeyValue::new("messaging.operation.name", "read"),
        KeyValue::new("messaging.destination.name", at.topic.to_string()),
        KeyValue::new("messaging.destination.partition.id", at.partition.to_string()),
        KeyValue::new("messaging.kafka.offset", at.offset),
        KeyValue::new("messaging.consumer.group.name", at.group.to_string()),
        KeyValue::new("messaging.message.body.size", message.payload().map_or(0, <[u8]>::len) as i64),
    ]);
    if let Some(error_type) = rejected {
        span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
        span.set_status(Status::error("invalid record"));
    }
    let ended = opentelemetry::time::now();
    span.end_with_timestamp(ended);
    RecordTrace { traceparent, read: Some((span.span_context().clone(), ended)), run: None }
}

/// Each sampled record's `buffer wait`, from its read to its flush.
pub fn buffer_waits<'a>(records: impl Iterator<Item = &'a RecordTrace>, flush_id: u64) {
    if tracer().is_none() {
        return;
    }
    let flushed = opentelemetry::time::now();
    for (read, ended) in records.filter_map(|record| record.read.as_ref()) {
        let builder = SpanBuilder::from_name("buffer wait").with_start_time(*ended);
        if let Some(mut span) = start(builder, &under(read)) {
            span.set_attribute(KeyValue::new("txnflow.flush.id", flush_id as i64));
            span.end_with_timestamp(flushed);
        }
    }
}

/// A flush's span, ended when the flush is settled (dropped).
#[derive(Debug, Default)]
pub struct FlushSpan(Option<Span>);

impl FlushSpan {
    /// The context the flush's own spans (ML calls, writes) start in.
    pub fn context(&self) -> Context {
        self.0.as_ref().map_or_else(Context::new, |span| under(span.span_context()))
    }

    /// The flush's trace id, when it is sampled: its log lines carry it.
    pub fn trace_id(&self) -> Option<String> {
        self.0.as_ref().map(|span| format!("{:032x}", span.span_context().trace_id()))
    }

    /// Notes the flush's outcome: rows written and dead-lettered.
    pub fn settled(&mut self, written: usize, dead_lettered: usize) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new("txnflow.flush.written", written as i64));
            span.set_attribute(KeyValue::new("txnflow.flush.dead_lettered", dead_lettered as i64));
        }
    }
}

/// The span of flush `flush_id`: under the records' batch run when they
/// are all of one, else a trace of its own; linked to each sampled
/// record's `read` (up to the span limit, `buffer.max_records`).
pub fn flush<'a>(flush_id: u64, trigger: &str, records: impl Iterator<Item = &'a RecordTrace> + Clone) -> FlushSpan {
    let Some(tracer) = tracer() else { return FlushSpan(None) };
    let mut runs = records.clone().map(|record| record.run.as_ref());
    let first = runs.next().flatten();
    let parent = match first {
        Some(run) if runs.all(|other| other.is_some_and(|other| other.span_id() == run.span_id())) => under(run),
        _ => Context::new(),
    };
    let links: Vec<Link> = records
        .clone()
        .filter_map(|record| record.read.as_ref())
        .map(|(read, _)| Link::with_context(read.clone()))
        .collect();
    let count = records.count();
    let builder = tracer.span_builder("flush").with_links(links);
    let span = start(builder, &parent).map(|mut span| {
        span.set_attributes([
            KeyValue::new("txnflow.flush.id", flush_id as i64),
            KeyValue::new("txnflow.flush.trigger", trigger.to_string()),
            KeyValue::new("messaging.batch.message_count", count as i64),
        ]);
        span
    });
    FlushSpan(span)
}

/// One HTTP request to the ML API, a child of the current context's span
/// (the flush's, where there is one).
pub struct MlCall {
    span: Option<Span>,
    traceparent: Option<String>,
}

/// What an ML call span records of the request.
pub struct MlRequest<'a> {
    /// The URL without credentials or query.
    pub url: &'a str,
    pub server: (&'a str, u16),
    pub attempt: u32,
    pub batch_size: usize,
    /// The breaker's state, for the pipeline's client.
    pub breaker: Option<&'a str>,
}

impl MlCall {
    pub fn start(request: &MlRequest<'_>) -> MlCall {
        let Some(tracer) = tracer() else { return MlCall { span: None, traceparent: None } };
        // Built even when not sampled: the request still carries the
        // trace, with its flag saying so.
        let span =
            tracer.span_builder("POST").with_kind(SpanKind::Client).start_with_context(tracer, &Context::current());
        let traceparent = Some(traceparent_header(span.span_context()));
        let span = span.is_recording().then_some(span).map(|mut span| {
            span.set_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("url.full", request.url.to_string()),
                KeyValue::new("server.address", request.server.0.to_string()),
                KeyValue::new("server.port", i64::from(request.server.1)),
                KeyValue::new("http.request.resend_count", i64::from(request.attempt.saturating_sub(1))),
                KeyValue::new("txnflow.predict.attempt", i64::from(request.attempt)),
                KeyValue::new("txnflow.predict.batch_size", request.batch_size as i64),
            ]);
            if let Some(state) = request.breaker {
                span.set_attribute(KeyValue::new("txnflow.breaker.state", state.to_string()));
            }
            span
        });
        MlCall { span, traceparent }
    }

    /// The `traceparent` header for the request.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// Ends the span with the answer's status, or the error's type.
    pub fn end(self, status: Option<u16>, error_type: Option<&str>) {
        let Some(mut span) = self.span else { return };
        if let Some(status) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        if let Some(error_type) = error_type {
            span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
            span.set_status(Status::error(error_type.to_string()));
        }
        span.end();
    }
}

/// The reference ML API's span of a request, under the caller's
/// `traceparent` when it sends a well-formed one.
pub struct MlApiRequest(Option<Span>);

impl MlApiRequest {
    pub fn start(traceparent: Option<&[u8]>) -> MlApiRequest {
        let Some(tracer) = tracer() else { return MlApiRequest(None) };
        let parent = traceparent.and_then(valid_traceparent).map_or_else(Context::new, |caller| remote(&caller, None));
        let builder = tracer.span_builder("POST /predict").with_kind(SpanKind::Server);
        MlApiRequest(start(builder, &parent).map(|mut span| {
            span.set_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("http.route", "/predict"),
            ]);
            span
        }))
    }

    pub fn end(self, status: u16) {
        if let Some(mut span) = self.0 {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
            if status >= 500 {
                span.set_status(Status::error(status.to_string()));
            }
            span.end();
        }
    }
}

/// One database write of a flush (one attempt), a child of the flush.
pub struct DbWrite(Option<Span>);

impl DbWrite {
    pub fn start(flush: &Context, rows: usize) -> DbWrite {
        let Some(tracer) = tracer() else { return DbWrite(None) };
        let builder = tracer.span_builder("INSERT transactions").with_kind(SpanKind::Client);
        DbWrite(start(builder, flush).map(|mut span| {
            span.set_attributes([
                KeyValue::new("db.system.name", "postgresql"),
                KeyValue::new("db.operation.name", "INSERT"),
                KeyValue::new("db.collection.name", "transactions"),
                KeyValue::new("db.operation.batch.size", rows as i64),
            ]);
            span
        }))
    }

    /// `outcome`: `ok`, `data_error` (some records refused), `retry` (the
    /// database failed; nothing is acknowledged) or `panicked`.
    pub fn end(self, outcome: &'static str) {
        let Some(mut span) = self.0 else { return };
        span.set_attribute(KeyValue::new("txnflow.write.outcome", outcome));
        if outcome != "ok" {
            span.set_attribute(KeyValue::new("error.type", outcome));
            span.set_status(Status::error(outcome));
        }
        span.end();
    }
}

/// A dead letter's publication, a child of its record's `read` (or run).
pub struct DlqSend(Option<Span>);

impl DlqSend {
    pub fn start(record: &RecordTrace, topic: &str, error_type: &str) -> DlqSend {
        let (Some(tracer), Some(parent)) = (tracer(), record.parent()) else { return DlqSend(None) };
        let builder = tracer.span_builder(format!("send {topic}")).with_kind(SpanKind::Producer);
        DlqSend(start(builder, &under(parent)).map(|mut span| {
            span.set_attributes([
                kafka(),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "send"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new("error.type", error_type.to_string()),
            ]);
            span
        }))
    }

    /// `outcome`: `published`, or `stored` in the dead_letters table
    /// because the topic refused it for good.
    pub fn end(self, outcome: &'static str) {
        if let Some(mut span) = self.0 {
            span.set_attribute(KeyValue::new("txnflow.dlq.outcome", outcome));
            span.end();
        }
    }
}

/// An offset commit, a trace of its own.
pub struct CommitSpan(Option<Span>);

impl CommitSpan {
    pub fn start(topic: &str, group: &str, partitions: usize, synchronous: bool) -> CommitSpan {
        let Some(tracer) = tracer() else { return CommitSpan(None) };
        let builder = tracer.span_builder(format!("commit {topic}")).with_kind(SpanKind::Client);
        CommitSpan(start(builder, &Context::new()).map(|mut span| {
            span.set_attributes([
                kafka(),
                KeyValue::new("messaging.operation.type", "settle"),
                KeyValue::new("messaging.operation.name", "commit"),
                KeyValue::new("messaging.destination.name", topic.to_string()),
                KeyValue::new("messaging.consumer.group.name", group.to_string()),
                KeyValue::new("txnflow.commit.partitions", partitions as i64),
                KeyValue::new("txnflow.commit.synchronous", synchronous),
            ]);
            span
        }))
    }

    pub fn end(self, failed: bool) {
        if let Some(mut span) = self.0 {
            if failed {
                span.set_attribute(KeyValue::new("error.type", "commit_failed"));
                span.set_status(Status::error("commit failed"));
            }
            span.end();
        }
    }
}

/// A batch run's span, the root of its trace; ended when dropped.
#[derive(Debug, Default)]
pub struct RunSpan(Option<Span>);

impl RunSpan {
    pub fn start(run_id: &str, files: usize) -> RunSpan {
        let Some(tracer) = tracer() else { return RunSpan(None) };
        RunSpan(start(tracer.span_builder("batch run"), &Context::new()).map(|mut span| {
            span.set_attributes([
                KeyValue::new("txnflow.run.id", run_id.to_string()),
                KeyValue::new("txnflow.run.files", files as i64),
            ]);
            span
        }))
    }

    fn context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|span| span.span_context().clone())
    }

    /// The span of one of the run's files; ended when dropped. `uri`
    /// names the file (never its content).
    pub fn file(&self, uri: &str) -> FileSpan {
        let (Some(tracer), Some(run)) = (tracer(), self.context()) else { return FileSpan::default() };
        let span = start(tracer.span_builder("file"), &under(&run)).map(|mut span| {
            span.set_attribute(KeyValue::new("txnflow.file.uri", uri.to_string()));
            span
        });
        FileSpan { _span: span }
    }
}

/// A batch file's span, ended when dropped.
#[derive(Debug, Default)]
pub struct FileSpan {
    _span: Option<Span>,
}
