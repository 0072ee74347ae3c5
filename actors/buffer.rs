//! Buffer: collects valid records and sends them on as one flush when it holds
//! `buffer.max_records` or when the oldest has waited `buffer.max_wait_ms`,
//! whichever comes first (contract §1).
//!
//! Each timer carries the id of the flush it was set for, so a timer set
//! for a flush that already left on size never sends a newer one early.

use actix::{Actor, AsyncContext, Context, Handler, Supervised};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Pipeline;
use super::mailbox::Mailbox;
use super::messages::{Envelope, FlushNow, FlushTrigger, Ingest, PredictFlush};
use super::predict_client::PredictClient;
use crate::metrics::METRICS;

pub struct Buffer {
    pipeline: Arc<Pipeline>,
    predict_client: Mailbox<PredictClient>,
    records: Vec<Envelope>,
    /// Id of the flush being filled.
    flush_id: u64,
}

impl Buffer {
    pub fn new(pipeline: Arc<Pipeline>, predict_client: Mailbox<PredictClient>) -> Buffer {
        Buffer { pipeline, predict_client, records: Vec::new(), flush_id: 0 }
    }

    /// Sends the oldest `count` records on as one flush.
    fn flush(&mut self, trigger: FlushTrigger, count: usize) {
        if self.records.is_empty() {
            return;
        }
        let rest = self.records.split_off(count.min(self.records.len()));
        let records = std::mem::replace(&mut self.records, rest);
        let flush_id = self.flush_id;
        self.flush_id += 1;
        METRICS.buffer_depth.set(self.records.len() as i64);
        METRICS.flush_size.with_label_values(&[trigger.as_str()]).observe(records.len() as f64);
        tracing::debug!(flush_id, size = records.len(), trigger = trigger.as_str(), "flush");
        // The records hold capacity permits, which bound what is in flight;
        // the PredictClient's mailbox never grows past that bound.
        self.predict_client.do_send(PredictFlush { flush_id, trigger, flushed_at: Instant::now(), records });
    }

    fn flush_all(&mut self, trigger: FlushTrigger) {
        let count = self.records.len();
        self.flush(trigger, count);
    }

    /// Arms the time trigger of the flush being filled.
    fn arm_timer(&self, ctx: &mut Context<Self>) {
        let flush_id = self.flush_id;
        let wait = Duration::from_millis(self.pipeline.config.buffer.max_wait_ms);
        ctx.run_later(wait, move |buffer, _| {
            if buffer.flush_id == flush_id {
                buffer.flush_all(FlushTrigger::Time);
            }
        });
    }
}

impl Actor for Buffer {
    type Context = Context<Self>;
}

impl Supervised for Buffer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // The records held are dropped (their permits return); the source reads them again.
        self.records.clear();
        METRICS.buffer_depth.set(0);
        self.flush_id += 1;
        self.pipeline.actor_restarted("buffer", "restarted by its supervisor");
    }
}

impl Handler<Ingest> for Buffer {
    type Result = ();

    fn handle(&mut self, Ingest(records): Ingest, ctx: &mut Context<Self>) {
        if records.is_empty() {
            return;
        }
        let was_empty = self.records.is_empty();
        self.records.extend(records);
        let max_records = self.pipeline.config.buffer.max_records;
        let mut flushed = false;
        while self.records.len() >= max_records {
            self.flush(FlushTrigger::Size, max_records);
            flushed = true;
        }
        // A new flush starts its own clock: when the buffer was empty, or
        // when a size flush left a remainder behind.
        if !self.records.is_empty() && (was_empty || flushed) {
            self.arm_timer(ctx);
        }
        METRICS.buffer_depth.set(self.records.len() as i64);
    }
}

impl Handler<FlushNow> for Buffer {
    type Result = ();

    fn handle(&mut self, _: FlushNow, _ctx: &mut Context<Self>) {
        self.flush_all(FlushTrigger::Forced);
    }
}

super::supervisor::chaos_hook!(Buffer, "buffer");
