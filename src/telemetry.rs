//! OpenTelemetry traces over OTLP/HTTP, when `tracing.otlp_endpoint` is set:
//! the pipeline's sampled spans (`crate::spans`) go through a bounded queue
//! to the SDK's batch processor (a thread of its own) and its OTLP exporter. A
//! collector that is down or slow never holds up the pipeline: a span that
//! finds the queue full is dropped, a batch the collector refuses or does
//! not take in `tracing.export_timeout_ms` is lost, and both are counted in
//! `txnflow_trace_spans_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
    Span, SpanData, SpanExporter, SpanProcessor,
};

use crate::config::TracingConfig;
use crate::metrics::METRICS;

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

/// Starts exporting the pipeline's spans (`crate::spans`) when
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
    let queued = Arc::new(AtomicUsize::new(0));
    let exporter = CountingExporter { inner: exporter, queued: queued.clone() };
    // The SDK's own queue is larger than ours, so that it never drops a span
    // uncounted: ours is the bound.
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(config.max_queue_spans + 1)
        .with_max_export_batch_size(config.max_export_batch.min(config.max_queue_spans))
        .build();
    let processor = BoundedProcessor {
        inner: BatchSpanProcessor::builder(exporter).with_batch_config(batch).build(),
        queued,
        capacity: config.max_queue_spans,
    };
    let mut resource = Resource::builder();
    // OTEL_SERVICE_NAME, read by the default detectors, wins over ours.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(RatioSampler { ratio: Sampler::TraceIdRatioBased(config.sample_ratio) })
        .with_max_links_per_span(u32::try_from(max_links).unwrap_or(u32::MAX))
        .with_resource(resource.build())
        .build();
    crate::spans::install(provider.tracer("txnflow"));
    Ok(Some(Tracing { provider }))
}

/// Samples every trace by its id at `sample_ratio`, whether it starts
/// here or came with a record's sampled `traceparent`, and never one whose
/// producer did not sample it. Deciding by the trace id alone gives every
/// span of a trace, and every process with the same ratio, the same
/// answer; a producer's "sampled" cannot make txnflow trace all its load.
#[derive(Debug, Clone)]
struct RatioSampler {
    ratio: Sampler,
}

impl ShouldSample for RatioSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        use opentelemetry::trace::TraceContextExt;
        let parent_span = parent.filter(|cx| cx.has_active_span()).map(|cx| cx.span().span_context().clone());
        let trace_state = parent_span.as_ref().map(|span| span.trace_state().clone()).unwrap_or_default();
        let decision = match &parent_span {
            Some(span) if span.is_valid() && !span.is_sampled() => SamplingDecision::Drop,
            _ => self.ratio.should_sample(None, trace_id, name, kind, attributes, links).decision,
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
