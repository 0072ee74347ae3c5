//! Buffer: collects valid records and sends them on as one flush when it holds
//! `buffer.max_records` or when the oldest has waited `buffer.max_wait_ms`,
//! whichever comes first.
//!
//! Each timer carries the id of the flush it was set for, so a timer set
//! for a flush that already left on size never sends a newer one early.

use actix::{Actor, AsyncContext, Context, Handler, Supervised};
use std::time::{Duration, Instant};

use super::mailbox::Mailbox;
use super::messages::{Envelope, FlushNow, FlushTrigger, Ingest, PredictFlush};
use super::predict_client::PredictClient;
use crate::config::BufferConfig;
use crate::observability::metrics::{METRICS, Phase, Stage};

/// The Buffer, sending its flushes to `Next`: the PredictClient, or a test's
/// stand-in.
pub struct Buffer<Next: Actor = PredictClient> {
    predict_client: Mailbox<Next>,
    max_records: usize,
    max_wait: Duration,
    records: Vec<Envelope>,
    /// Id of the flush being filled.
    flush_id: u64,
}

/// What the Buffer needs of its next stage: to take a flush.
pub trait TakesFlushes: Actor<Context = Context<Self>> + Handler<PredictFlush> {}
impl<A: Actor<Context = Context<A>> + Handler<PredictFlush>> TakesFlushes for A {}

impl<Next: TakesFlushes> Buffer<Next> {
    pub fn new(config: &BufferConfig, predict_client: Mailbox<Next>) -> Buffer<Next> {
        Buffer {
            predict_client,
            max_records: config.max_records,
            max_wait: Duration::from_millis(config.max_wait_ms),
            records: Vec::new(),
            flush_id: 0,
        }
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
        let flushed_at = Instant::now();
        let waited = Stage::Buffer.histogram(Phase::Wait);
        for record in &records {
            waited.observe(flushed_at.duration_since(record.ack.read_at()).as_secs_f64());
        }
        tracing::debug!(flush_id, size = records.len(), trigger = trigger.as_str(), "flush");
        crate::observability::spans::buffer_waits(records.iter().map(|record| &record.trace), flush_id);
        let span =
            crate::observability::spans::flush(flush_id, trigger.as_str(), records.iter().map(|record| &record.trace));
        // The records hold capacity permits, which bound what is in flight;
        // the PredictClient's mailbox never grows past that bound.
        self.predict_client.do_send(PredictFlush { flush_id, trigger, flushed_at, records, span });
    }

    fn flush_all(&mut self, trigger: FlushTrigger) {
        let count = self.records.len();
        self.flush(trigger, count);
    }

    /// Arms the time trigger of the flush being filled.
    fn arm_timer(&self, ctx: &mut Context<Self>) {
        let flush_id = self.flush_id;
        ctx.run_later(self.max_wait, move |buffer, _| {
            if buffer.flush_id == flush_id {
                buffer.flush_all(FlushTrigger::Time);
            }
        });
    }
}

impl<Next: TakesFlushes> Actor for Buffer<Next> {
    type Context = Context<Self>;
}

impl<Next: TakesFlushes> Supervised for Buffer<Next> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // The records held are dropped (their permits return); the source reads them again.
        self.records.clear();
        METRICS.buffer_depth.set(0);
        self.flush_id += 1;
        super::supervisor::restarted("buffer", "restarted by its supervisor");
    }
}

impl<Next: TakesFlushes> Handler<Ingest> for Buffer<Next> {
    type Result = ();

    fn handle(&mut self, Ingest(records): Ingest, ctx: &mut Context<Self>) {
        if records.is_empty() {
            return;
        }
        let was_empty = self.records.is_empty();
        self.records.extend(records);
        let max_records = self.max_records;
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

impl<Next: TakesFlushes> Handler<FlushNow> for Buffer<Next> {
    type Result = ();

    fn handle(&mut self, _: FlushNow, _ctx: &mut Context<Self>) {
        self.flush_all(FlushTrigger::Forced);
    }
}

super::supervisor::chaos_hook!(Buffer, "buffer");

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant as PausedInstant;

    /// Each flush the Buffer sent: what made it, how many records, and when
    /// (on the paused clock, from the test's start).
    type Flushes = Arc<Mutex<Vec<(FlushTrigger, usize, Duration)>>>;

    /// The PredictClient's stand-in: notes each flush.
    struct NextStage {
        flushes: Flushes,
        started: PausedInstant,
    }

    impl Actor for NextStage {
        type Context = Context<Self>;
    }

    impl Handler<PredictFlush> for NextStage {
        type Result = ();

        fn handle(&mut self, flush: PredictFlush, _: &mut Context<Self>) {
            self.flushes.lock().unwrap().push((flush.trigger, flush.records.len(), self.started.elapsed()));
        }
    }

    fn records(count: usize) -> Vec<Envelope> {
        crate::actors::messages::test_envelopes(&vec!["a purchase"; count])
    }

    /// Runs `test` in an actix system on tokio's paused clock: sleeping
    /// advances time at once, so a second of Buffer time costs none.
    fn on_paused_clock(test: impl AsyncFnOnce(actix::Addr<Buffer<NextStage>>, Flushes)) {
        let system = actix::System::with_tokio_rt(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
        });
        system.block_on(async {
            let flushes = Flushes::default();
            let next = NextStage { flushes: flushes.clone(), started: PausedInstant::now() }.start();
            let mailbox = Mailbox::default();
            mailbox.point_to(next);
            let config = BufferConfig { max_records: 3, max_wait_ms: 1000, capacity: 100, capacity_bytes: 100 };
            test(Buffer::new(&config, mailbox).start(), flushes).await;
        });
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_buffer_flushes_at_once_and_the_rest_when_its_oldest_has_waited() {
        on_paused_clock(async |buffer, flushes| {
            buffer.send(Ingest(records(7))).await.unwrap();
            tokio::time::sleep(999 * MS).await;
            assert_eq!(
                *flushes.lock().unwrap(),
                [(FlushTrigger::Size, 3, Duration::ZERO), (FlushTrigger::Size, 3, Duration::ZERO)]
            );
            tokio::time::sleep(2 * MS).await;
            assert_eq!(flushes.lock().unwrap()[2], (FlushTrigger::Time, 1, 1000 * MS), "the remainder's own clock");
        });
    }

    #[test]
    fn the_time_trigger_counts_from_the_oldest_record() {
        on_paused_clock(async |buffer, flushes| {
            buffer.send(Ingest(records(1))).await.unwrap();
            tokio::time::sleep(600 * MS).await;
            buffer.send(Ingest(records(1))).await.unwrap();
            tokio::time::sleep(600 * MS).await;
            assert_eq!(*flushes.lock().unwrap(), [(FlushTrigger::Time, 2, 1000 * MS)], "not 1,600 ms");
        });
    }

    #[test]
    fn a_timer_set_for_a_flush_that_left_on_size_sends_no_later_one_early() {
        on_paused_clock(async |buffer, flushes| {
            buffer.send(Ingest(records(2))).await.unwrap();
            tokio::time::sleep(500 * MS).await;
            buffer.send(Ingest(records(1))).await.unwrap(); // 3: the first flush leaves on size
            tokio::time::sleep(200 * MS).await;
            buffer.send(Ingest(records(1))).await.unwrap(); // a new flush, its clock at 700 ms
            tokio::time::sleep(1100 * MS).await;
            assert_eq!(
                *flushes.lock().unwrap(),
                [(FlushTrigger::Size, 3, 500 * MS), (FlushTrigger::Time, 1, 1700 * MS)],
                "the first flush's timer, at 1,000 ms, sent nothing"
            );
        });
    }

    #[test]
    fn flush_now_sends_everything_held_and_nothing_when_empty() {
        on_paused_clock(async |buffer, flushes| {
            buffer.send(FlushNow).await.unwrap();
            buffer.send(Ingest(records(2))).await.unwrap();
            buffer.send(FlushNow).await.unwrap();
            tokio::time::sleep(2000 * MS).await;
            assert_eq!(
                *flushes.lock().unwrap(),
                [(FlushTrigger::Forced, 2, Duration::ZERO)],
                "no empty flush, no timer left"
            );
        });
    }
}
