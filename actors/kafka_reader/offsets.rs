//! The reader's offsets in flight: what its records' handles report, and
//! what a commit may send. The bookkeeping is the pure
//! [`PartitionOffsets`]; this adds the lock and the wake-ups the read loop
//! and the commit loop wait on.

use crate::actors::acknowledgement::{Settlement, Tracker};
use crate::domain::offsets::PartitionOffsets;
use crate::domain::origin::Origin;

/// One consumer's offsets in flight: the tracker its records' handles
/// report to. A new consumer (after a restart) gets a new one, so the
/// reports of records read by the old one change nothing.
#[derive(Default)]
pub struct ReadOffsets {
    pub(super) offsets: std::sync::Mutex<PartitionOffsets>,
    /// Records became durable: a commit may move.
    pub(super) progress: tokio::sync::Notify,
    /// A record was lost: its partition is to be read again.
    pub(super) losses: tokio::sync::Notify,
}

impl ReadOffsets {
    /// The lock is taken in a handle's drop, during a panic's unwinding
    /// too: a poisoned lock is used as it is, never a second panic.
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, PartitionOffsets> {
        self.offsets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reader is going (a restart, a panic, the end): what it has in
    /// flight is the next owner's to read, so the revoke that closing its
    /// consumer brings waits for none of it and commits nothing more.
    pub(super) fn abandon(&self) {
        *self.lock() = PartitionOffsets::default();
    }

    /// What a commit of `kind` sends: `(partition, next offset to read)`
    /// for each partition whose records before it are all durable, among
    /// those `held` says this reader holds (a revoked partition is its new
    /// owner's to commit).
    pub(super) fn to_commit(&self, kind: Commits, held: impl Fn(i32) -> bool) -> Vec<(i32, i64)> {
        let commits = match kind {
            Commits::Moved => self.lock().take_commits(),
            Commits::All | Commits::AllNow => self.lock().committable(),
        };
        commits.into_iter().filter(|(partition, _)| held(*partition)).collect()
    }

    /// Whether a record of `partitions` is still in flight and worth
    /// waiting for before their commit.
    pub(super) fn awaits_any(&self, partitions: &[i32]) -> bool {
        let offsets = self.lock();
        partitions.iter().any(|partition| offsets.awaited(*partition) > 0)
    }

    /// A revoke: what may be committed of the `revoked` partitions, which
    /// this reader then forgets.
    pub(super) fn release(&self, revoked: &[i32]) -> Vec<(i32, i64)> {
        let mut offsets = self.lock();
        let commits = offsets.committable().into_iter().filter(|(partition, _)| revoked.contains(partition)).collect();
        for partition in revoked {
            offsets.forget(*partition);
        }
        commits
    }
}

impl Tracker for ReadOffsets {
    fn report(&self, records: &[(&Origin, u64)], settlement: Settlement) {
        let kafka = records.iter().filter_map(|(origin, generation)| match origin {
            Origin::Kafka { partition, offset, .. } => Some((*partition, *offset, *generation)),
            Origin::File { .. } => None,
        });
        match settlement {
            Settlement::Lost { stored: false } => {
                let mut offsets = self.lock();
                kafka.for_each(|(partition, offset, generation)| offsets.lost(partition, offset, generation));
                drop(offsets);
                self.losses.notify_one();
            }
            // In PostgreSQL already: durable, though its dead letter was lost.
            Settlement::Lost { stored: true } => {}
            Settlement::Predicted
            | Settlement::AlreadyStored
            | Settlement::StoredUnpredicted
            | Settlement::DeadLettered { .. } => {
                let mut offsets = self.lock();
                kafka.for_each(|(partition, offset, _)| offsets.durable(partition, offset));
                drop(offsets);
                self.progress.notify_one();
            }
        }
    }
}

/// Which offsets a commit sends, and how.
#[derive(Clone, Copy)]
pub(super) enum Commits {
    /// Those that moved since the last commit, asynchronously.
    Moved,
    /// Every committable one, asynchronously.
    All,
    /// Every committable one, synchronously.
    AllNow,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(partition: i32, offset: i64) -> Origin {
        Origin::Kafka { topic: "t".to_string(), partition, offset }
    }

    /// Reads `offsets` of `partition`; returns each record's generation.
    fn read(reader: &ReadOffsets, partition: i32, offsets: std::ops::Range<i64>) -> Vec<u64> {
        offsets.map(|offset| reader.lock().read(partition, offset)).collect()
    }

    fn settle(reader: &ReadOffsets, partition: i32, offsets: &[i64], generation: u64, settlement: Settlement) {
        let origins: Vec<Origin> = offsets.iter().map(|offset| origin(partition, *offset)).collect();
        let records: Vec<(&Origin, u64)> = origins.iter().map(|origin| (origin, generation)).collect();
        reader.report(&records, settlement);
    }

    const ALL_HELD: fn(i32) -> bool = |_| true;

    #[test]
    fn a_commit_stops_at_the_first_record_not_durable() {
        let reader = ReadOffsets::default();
        let generation = read(&reader, 0, 0..5)[0];
        read(&reader, 1, 0..3);
        settle(&reader, 0, &[0, 1, 3], generation, Settlement::Predicted);
        let p1 = reader.lock().read(1, 3);
        settle(&reader, 1, &[0, 1, 2, 3], p1, Settlement::DeadLettered { stored: false });
        assert_eq!(reader.to_commit(Commits::Moved, ALL_HELD), vec![(0, 2), (1, 4)]);
        assert_eq!(reader.to_commit(Commits::Moved, ALL_HELD), vec![], "nothing moved since");
        assert_eq!(reader.to_commit(Commits::All, ALL_HELD), vec![(0, 2), (1, 4)], "all, moved or not");
        settle(&reader, 0, &[2], generation, Settlement::StoredUnpredicted);
        assert_eq!(reader.to_commit(Commits::Moved, ALL_HELD), vec![(0, 4)], "up to the next in flight, 4");
    }

    #[test]
    fn only_the_partitions_held_are_committed() {
        let reader = ReadOffsets::default();
        for partition in 0..3 {
            let generation = read(&reader, partition, 0..2)[0];
            settle(&reader, partition, &[0, 1], generation, Settlement::Predicted);
        }
        assert_eq!(reader.to_commit(Commits::AllNow, |partition| partition != 1), vec![(0, 2), (2, 2)]);
    }

    #[test]
    fn a_failed_commit_is_offered_again() {
        let reader = ReadOffsets::default();
        let generation = read(&reader, 0, 0..3)[0];
        settle(&reader, 0, &[0, 1, 2], generation, Settlement::Predicted);
        assert_eq!(reader.to_commit(Commits::Moved, ALL_HELD), vec![(0, 3)]);
        reader.lock().commit_failed(0, 3);
        assert_eq!(reader.to_commit(Commits::Moved, ALL_HELD), vec![(0, 3)]);
    }

    #[test]
    fn a_lost_record_holds_the_commit_and_rewinds_its_partition() {
        let reader = ReadOffsets::default();
        let generation = read(&reader, 0, 0..4)[0];
        settle(&reader, 0, &[0, 3], generation, Settlement::Predicted);
        settle(&reader, 0, &[1], generation, Settlement::Lost { stored: false });
        assert_eq!(reader.to_commit(Commits::All, ALL_HELD), vec![(0, 1)], "no commit passes the lost record");
        assert!(!reader.awaits_any(&[0]), "a revoke waits for nothing once a record is lost");
        assert_eq!(reader.lock().take_rewinds(), vec![(0, 1)], "read again from the first not durable");
        // The late report of the old reading's record 2 changes nothing.
        settle(&reader, 0, &[2], generation, Settlement::Lost { stored: false });
        assert_eq!(reader.lock().take_rewinds(), vec![]);
    }

    #[test]
    fn a_record_lost_after_it_was_stored_asks_for_no_rewind() {
        let reader = ReadOffsets::default();
        let generation = read(&reader, 0, 0..2)[0];
        settle(&reader, 0, &[0], generation, Settlement::Lost { stored: true });
        assert_eq!(reader.lock().take_rewinds(), vec![]);
        assert!(reader.awaits_any(&[0]), "its dead letter is still awaited");
    }

    #[test]
    fn a_revoke_commits_and_forgets_only_the_revoked_partitions() {
        let reader = ReadOffsets::default();
        for partition in 0..3 {
            let generation = read(&reader, partition, 0..3)[0];
            settle(&reader, partition, &[0, 1], generation, Settlement::Predicted);
        }
        assert!(reader.awaits_any(&[1]), "offset 2 of partition 1 is in flight");
        assert_eq!(reader.release(&[1, 2]), vec![(1, 2), (2, 2)]);
        assert!(!reader.awaits_any(&[1, 2]));
        assert_eq!(reader.to_commit(Commits::All, ALL_HELD), vec![(0, 2)], "partition 0 is still held");
    }

    #[test]
    fn an_abandoned_reader_commits_nothing_and_old_reports_change_nothing() {
        let reader = ReadOffsets::default();
        let generation = read(&reader, 0, 0..3)[0];
        reader.abandon();
        settle(&reader, 0, &[0, 1, 2], generation, Settlement::Predicted);
        settle(&reader, 0, &[1], generation, Settlement::Lost { stored: false });
        assert_eq!(reader.to_commit(Commits::AllNow, ALL_HELD), vec![]);
        assert_eq!(reader.lock().take_rewinds(), vec![]);
    }
}
