//! OpenTelemetry traces over OTLP/HTTP, when `tracing.otlp_endpoint` is set:
//! the pipeline's sampled spans (`crate::observability::spans`) go through a bounded queue
//! to the SDK's batch processor (a thread of its own) and its OTLP exporter. A
//! collector that is down or slow never holds up the pipeline: a span that
//! finds the queue full is dropped, a batch the collector refuses or does
//! not take in `tracing.export_timeout_ms` is lost, and both are counted in
//! `txnflow_trace_spans_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::{Link, SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SamplingDecision, SamplingResult,
    SdkTracerProvider, ShouldSample, Span, SpanData, SpanExporter, SpanProcessor,
};

use crate::config::TracingConfig;
use crate::domain::trace_context::sampled_at;
use crate::observability::metrics::METRICS;

/// The tracer provider of the process, to flush and shut down at exit.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is queued, within the export timeout, and stops.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(error = %error, "trace export did not finish at shutdown");
        }
    }
}

/// Starts exporting the pipeline's spans (`crate::observability::spans`) when
/// `tracing.otlp_endpoint` is set: the provider to shut down at exit, or
/// None when tracing is off. A flush links to at most `max_links` records.
pub fn start(config: &TracingConfig, max_links: usize) -> anyhow::Result<Option<Tracing>> {
    if config.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&config.otlp_endpoint)
        .with_timeout(Duration::from_millis(config.export_timeout_ms))
        .build()?;
    let processor = bounded(exporter, config.max_queue_spans, config.max_export_batch);
    let mut resource = Resource::builder();
    // OTEL_SERVICE_NAME, read by the default detectors, wins over ours.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(RatioSampler { ratio: config.sample_ratio })
        .with_id_generator(PresetIds)
        .with_max_links_per_span(u32::try_from(max_links).unwrap_or(u32::MAX))
        .with_resource(resource.build())
        .build();
    crate::observability::spans::install(provider.tracer("txnflow"), config.sample_ratio);
    Ok(Some(Tracing { provider }))
}

thread_local! {
    /// The trace id the next root span built on this thread takes.
    static PRESET_TRACE_ID: std::cell::Cell<Option<TraceId>> = const { std::cell::Cell::new(None) };
}

/// Builds a root span with `trace_id` (see [`PresetIds`]).
pub(crate) fn with_trace_id<T>(trace_id: u128, build: impl FnOnce() -> T) -> T {
    PRESET_TRACE_ID.set(Some(TraceId::from(trace_id)));
    let built = build();
    PRESET_TRACE_ID.set(None);
    built
}

/// The SDK's random ids, except a root span's trace id chosen beforehand:
/// a record without a `traceparent` draws its trace id and samples it
/// before any span is built, so that the records not sampled cost no span.
#[derive(Debug)]
struct PresetIds;

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET_TRACE_ID.take().unwrap_or_else(|| RandomIdGenerator::default().new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// The SDK's batch processor for `exporter` behind a queue bound of
/// `max_queue_spans`, exporting batches of `max_export_batch`.
fn bounded<E: SpanExporter + 'static>(
    exporter: E,
    max_queue_spans: usize,
    max_export_batch: usize,
) -> BoundedProcessor {
    let queued = Arc::new(AtomicUsize::new(0));
    let exporter = CountingExporter { inner: exporter, queued: queued.clone() };
    // The SDK's own queue is larger than ours, so that it never drops a span
    // uncounted: ours is the bound.
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(max_queue_spans + 1)
        .with_max_export_batch_size(max_export_batch.min(max_queue_spans))
        .build();
    BoundedProcessor {
        inner: BatchSpanProcessor::builder(exporter).with_batch_config(batch).build(),
        queued,
        capacity: max_queue_spans,
    }
}

/// Samples every trace by its id at `sample_ratio`
/// (`domain::trace_context::sampled_at`), whether it starts here or came
/// with a record's sampled `traceparent`, and never one whose producer did
/// not sample it. A producer's "sampled" cannot make txnflow trace all its
/// load. A span linked to a sampled one (a flush serving a traced record)
/// is sampled, so that every traced record's flush is there to follow.
#[derive(Debug, Clone)]
struct RatioSampler {
    ratio: f64,
}

impl ShouldSample for RatioSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        _name: &str,
        _kind: &SpanKind,
        _attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        use opentelemetry::trace::TraceContextExt;
        let parent_span = parent.filter(|cx| cx.has_active_span()).map(|cx| cx.span().span_context().clone());
        let trace_state = parent_span.as_ref().map(|span| span.trace_state().clone()).unwrap_or_default();
        let unsampled_parent = parent_span.as_ref().is_some_and(|span| span.is_valid() && !span.is_sampled());
        let id = u128::from_be_bytes(trace_id.to_bytes());
        let serves_a_sampled_one = links.iter().any(|link| link.span_context.is_sampled());
        let decision = if !unsampled_parent && (serves_a_sampled_one || sampled_at(self.ratio, id)) {
            SamplingDecision::RecordAndSample
        } else {
            SamplingDecision::Drop
        };
        SamplingResult { decision, attributes: Vec::new(), trace_state }
    }
}

/// Bounds the spans waiting for export: past `capacity`, a span is dropped
/// and counted instead of queued.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| (queued < self.capacity).then_some(queued + 1));
        if taken.is_ok() {
            self.inner.on_end(span);
        } else {
            METRICS.trace_spans.with_label_values(&["dropped_queue_full"]).inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts what the collector took and what it did not, and frees the
/// queue's places of the spans it was handed.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        self.queued.fetch_sub(spans, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        let outcome = if result.is_ok() { "exported" } else { "dropped_export_failed" };
        METRICS.trace_spans.with_label_values(&[outcome]).inc_by(spans as u64);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, Status};
    use std::sync::{Condvar, Mutex};

    /// An exporter whose exports wait until the test opens the gate, and
    /// which counts the spans it is given.
    #[derive(Debug, Clone)]
    struct Gated {
        open: Arc<(Mutex<bool>, Condvar)>,
        exported: Arc<AtomicUsize>,
    }

    impl SpanExporter for Gated {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = opened.wait(is_open).unwrap();
            }
            self.exported.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "a span".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    /// A collector that does not answer: past the bound of 4 waiting spans
    /// (and the 2 of the export under way), each span is dropped and
    /// counted, never queued; once the collector answers, every span is
    /// either exported or counted as dropped.
    #[test]
    fn a_full_queue_drops_and_counts_spans_instead_of_growing() {
        let gate = Gated { open: Arc::new((Mutex::new(false), Condvar::new())), exported: Arc::default() };
        let processor = bounded(gate.clone(), 4, 2);
        let dropped = || METRICS.trace_spans.with_label_values(&["dropped_queue_full"]).get();
        let before = dropped();
        for _ in 0..20 {
            processor.on_end(span());
        }
        let refused = dropped() - before;
        assert!(refused >= 14, "at most 4 waiting and 2 in the stalled export: {refused} dropped");
        *gate.open.0.lock().unwrap() = true;
        gate.open.1.notify_all();
        processor.force_flush().unwrap();
        let exported = gate.exported.load(Ordering::SeqCst) as u64;
        assert_eq!(exported + refused, 20, "every span exported or counted as dropped");
        assert_eq!(METRICS.trace_spans.with_label_values(&["exported"]).get(), exported);
        processor.shutdown_with_timeout(Duration::from_secs(5)).unwrap();
    }
}
