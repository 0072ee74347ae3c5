//! The acknowledgement handle each record carries from its source to the
//! place it ends in.
//!
//! A source (the KafkaReader, a batch run) makes an [`Ack`] for every record
//! it reads, with the record's origin, its share of the pipeline's capacity
//! and the source's own [`Tracker`]. The stages pass it along untouched;
//! the DbWriter and the DlqPublisher settle it, and never need to know where
//! the record came from. A handle dropped unsettled (an actor crashed with
//! the record, a partition was revoked) tells its tracker the record was
//! lost, so the source reads it again. Either way the capacity comes back.

use std::sync::Arc;

use super::capacity::Reserved;
use crate::domain::origin::Origin;

/// What became of a record, as its source is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// In PostgreSQL with its prediction: nothing more happens to it.
    Predicted,
    /// Stored before by another run (another run id, or the stream for a
    /// batch row), left as it was: nothing more happens to it.
    AlreadyStored,
    /// In PostgreSQL without a prediction; its `prediction_failed` dead
    /// letter is on its way, with the handle.
    StoredUnpredicted,
    /// Its dead letter is acknowledged; `stored` when the record is in
    /// PostgreSQL as well (a failed prediction), not when it was refused.
    DeadLettered { stored: bool },
    /// Dropped before it was settled; `stored` when it reached PostgreSQL
    /// first (only its dead letter was lost).
    Lost { stored: bool },
}

/// A source's bookkeeping of the records it read: the reader's offsets, or
/// a batch run's progress. Each record comes with the `mark` the source
/// gave its handle when it read it (the reader's partition generation), so
/// that a late report can be told from a current one. A flush's records are
/// reported together, so a tracker takes its lock and wakes its waiters
/// once per flush, not once per record.
pub trait Tracker: Send + Sync {
    fn report(&self, records: &[(&Origin, u64)], settlement: Settlement);
}

/// One record's acknowledgement: settled once, or reported lost when dropped.
pub struct Ack {
    origin: Origin,
    mark: u64,
    tracker: Arc<dyn Tracker>,
    stored: bool,
    settled: bool,
    /// When the source read the record.
    read_at: std::time::Instant,
    /// Returned to the pipeline when the handle goes, settled or not.
    _capacity: Reserved,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack").field("origin", &self.origin).field("stored", &self.stored).finish_non_exhaustive()
    }
}

impl Ack {
    pub fn new(origin: Origin, capacity: Reserved, tracker: Arc<dyn Tracker>, mark: u64) -> Ack {
        let read_at = std::time::Instant::now();
        Ack { origin, mark, tracker, stored: false, settled: false, read_at, _capacity: capacity }
    }

    /// When the source read the record (the handle was made).
    pub fn read_at(&self) -> std::time::Instant {
        self.read_at
    }

    /// Where the record came from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// These records and their predictions are in PostgreSQL. Each tracker
    /// is told once, for all of its records.
    pub fn predicted(acks: Vec<Ack>) {
        Ack::settle_all(acks, Settlement::Predicted);
    }

    /// The records' transactions were stored before by another run and are
    /// left as they were: the handles go.
    pub fn already_stored(acks: Vec<Ack>) {
        Ack::settle_all(acks, Settlement::AlreadyStored);
    }

    /// Reports the settlement of every record, one report per source.
    fn settle_all(acks: Vec<Ack>, settlement: Settlement) {
        let mut acks = acks;
        while let Some(first) = acks.first() {
            let tracker = first.tracker.clone();
            let (mut same, rest): (Vec<Ack>, Vec<Ack>) =
                acks.into_iter().partition(|ack| Arc::ptr_eq(&ack.tracker, &tracker));
            let records: Vec<(&Origin, u64)> = same.iter().map(|ack| (&ack.origin, ack.mark)).collect();
            tracker.report(&records, settlement);
            for ack in &mut same {
                ack.settled = true;
            }
            acks = rest;
        }
    }

    /// The record is in PostgreSQL without its prediction; the handle goes
    /// on with its dead letter.
    pub fn stored_unpredicted(&mut self) {
        self.stored = true;
        self.tracker.report(&[(&self.origin, self.mark)], Settlement::StoredUnpredicted);
    }

    /// The record's dead letter is acknowledged (by the DLQ topic, or the
    /// `dead_letters` table).
    pub fn dead_lettered(mut self) {
        self.settled = true;
        self.tracker.report(&[(&self.origin, self.mark)], Settlement::DeadLettered { stored: self.stored });
    }
}

impl Drop for Ack {
    /// Runs during a panic's unwinding too, so a tracker's report must not panic.
    fn drop(&mut self) {
        if !self.settled {
            self.tracker.report(&[(&self.origin, self.mark)], Settlement::Lost { stored: self.stored });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;

    /// Records every report: how many records it held, and each record.
    #[derive(Default)]
    struct Reports(Mutex<Vec<(usize, Origin, u64, Settlement)>>);

    impl Tracker for Reports {
        fn report(&self, records: &[(&Origin, u64)], settlement: Settlement) {
            let mut reports = self.0.lock().unwrap();
            for (origin, mark) in records {
                reports.push((records.len(), (*origin).clone(), *mark, settlement));
            }
        }
    }

    fn origin(line: u64) -> Origin {
        Origin::File { source_uri: "s3://in/a.csv".into(), line }
    }

    /// A handle with one unit of a capacity of 2 records and 100 bytes.
    fn handle(capacity: &(Arc<Semaphore>, Arc<Semaphore>), reports: &Arc<Reports>, line: u64) -> Ack {
        let record = capacity.0.clone().try_acquire_owned().unwrap();
        let bytes = capacity.1.clone().try_acquire_many_owned(10).unwrap();
        Ack::new(origin(line), Reserved { _record: record, _bytes: bytes }, reports.clone(), 7)
    }

    fn capacity() -> (Arc<Semaphore>, Arc<Semaphore>) {
        (Arc::new(Semaphore::new(2)), Arc::new(Semaphore::new(100)))
    }

    #[test]
    fn each_way_of_settling_is_reported_once_and_returns_the_capacity() {
        let (capacity, reports) = (capacity(), Arc::new(Reports::default()));
        let predicted = handle(&capacity, &reports, 1);
        let mut unpredicted = handle(&capacity, &reports, 2);
        assert_eq!((capacity.0.available_permits(), capacity.1.available_permits()), (0, 80));
        Ack::predicted(vec![predicted]);
        unpredicted.stored_unpredicted();
        assert_eq!(capacity.0.available_permits(), 1, "the settled record's capacity is back");
        unpredicted.dead_lettered();
        let refused = handle(&capacity, &reports, 3);
        refused.dead_lettered();
        assert_eq!((capacity.0.available_permits(), capacity.1.available_permits()), (2, 100));
        assert_eq!(
            *reports.0.lock().unwrap(),
            [
                (1, origin(1), 7, Settlement::Predicted),
                (1, origin(2), 7, Settlement::StoredUnpredicted),
                (1, origin(2), 7, Settlement::DeadLettered { stored: true }),
                (1, origin(3), 7, Settlement::DeadLettered { stored: false }),
            ]
        );
    }

    #[test]
    fn a_handle_dropped_unsettled_reports_the_loss_and_returns_the_capacity() {
        let (capacity, reports) = (capacity(), Arc::new(Reports::default()));
        let lost = handle(&capacity, &reports, 1);
        let mut lost_after_store = handle(&capacity, &reports, 2);
        lost_after_store.stored_unpredicted();
        drop(vec![lost, lost_after_store]);
        assert_eq!((capacity.0.available_permits(), capacity.1.available_permits()), (2, 100));
        assert_eq!(
            *reports.0.lock().unwrap(),
            [
                (1, origin(2), 7, Settlement::StoredUnpredicted),
                (1, origin(1), 7, Settlement::Lost { stored: false }),
                (1, origin(2), 7, Settlement::Lost { stored: true }),
            ]
        );
    }

    #[test]
    fn a_handle_dropped_by_a_panicking_thread_still_reports_the_loss() {
        let (capacity, reports) = (capacity(), Arc::new(Reports::default()));
        let held = handle(&capacity, &reports, 1);
        let crashed = std::thread::spawn(move || {
            let _held = held;
            panic!("an actor crashes with the record");
        })
        .join();
        assert!(crashed.is_err());
        assert_eq!(capacity.0.available_permits(), 2);
        assert_eq!(*reports.0.lock().unwrap(), [(1, origin(1), 7, Settlement::Lost { stored: false })]);
    }

    #[test]
    fn a_flush_predicted_is_reported_once_per_tracker() {
        let (capacity, first, second) = (
            (Arc::new(Semaphore::new(3)), Arc::new(Semaphore::new(100))),
            Arc::new(Reports::default()),
            Arc::new(Reports::default()),
        );
        let flush = vec![handle(&capacity, &first, 1), handle(&capacity, &second, 2), handle(&capacity, &first, 3)];
        Ack::predicted(flush);
        assert_eq!(capacity.0.available_permits(), 3, "every handle settled and gone");
        assert_eq!(
            *first.0.lock().unwrap(),
            [(2, origin(1), 7, Settlement::Predicted), (2, origin(3), 7, Settlement::Predicted)],
            "one report of both its records"
        );
        assert_eq!(*second.0.lock().unwrap(), [(1, origin(2), 7, Settlement::Predicted)]);
    }
}
