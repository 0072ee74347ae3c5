//! Which Kafka offsets may be committed, as pure bookkeeping.
//!
//! Records of one partition finish out of order: a batch of invalid records
//! reaches the DLQ before the valid ones before them are written. Kafka's
//! committed offset means "everything before this is done", so per partition
//! the committable offset is the lowest offset still in flight, or one past
//! the highest offset read when nothing is in flight.
//!
//! A record lost in flight (an actor crashed with it) keeps its offset in
//! flight, so no commit passes it, and marks its partition for a rewind:
//! reading starts again at the partition's committable offset. Each reading
//! of a partition has a generation, handed to the records read in it, so
//! that a loss reported late, for a record already read again, causes no
//! second rewind.

use std::collections::{BTreeMap, BTreeSet};

/// One partition's records read and not yet durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset read; `None` until something is read.
    next: Option<i64>,
    /// The last offset handed out for commit, to avoid committing it twice.
    committed: Option<i64>,
    /// The reading the records in flight belong to.
    generation: u64,
    /// A record of this generation was lost: read again from the committable offset.
    lost: bool,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

/// The in-flight offsets of every assigned partition.
#[derive(Debug, Clone, Default)]
pub struct PartitionOffsets {
    partitions: BTreeMap<i32, PartitionState>,
    /// The last generation handed out, across partitions, so that one is
    /// never reused (not even after a partition is forgotten and assigned again).
    generations: u64,
}

impl PartitionOffsets {
    /// A record at `offset` was read and is now in flight. Returns the
    /// reading's generation, for [`PartitionOffsets::lost`].
    pub fn read(&mut self, partition: i32, offset: i64) -> u64 {
        let generations = &mut self.generations;
        let state = self.partitions.entry(partition).or_insert_with(|| {
            *generations += 1;
            PartitionState { generation: *generations, ..PartitionState::default() }
        });
        state.in_flight.insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |next| next.max(offset + 1)));
        state.generation
    }

    /// The record at `offset` is durable (in PostgreSQL, or acknowledged by
    /// the DLQ). Acks for offsets not in flight, such as late acks from
    /// before a rewind, change nothing: they only ever confirm durability.
    pub fn durable(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.in_flight.remove(&offset);
        }
    }

    /// The record at `offset`, read in `generation`, was lost before it was
    /// durable: its partition is to be read again from its committable
    /// offset. A loss from an earlier reading changes nothing, since that
    /// reading's records are read again already.
    pub fn lost(&mut self, partition: i32, offset: i64, generation: u64) {
        if let Some(state) = self.partitions.get_mut(&partition)
            && state.generation == generation
            && state.in_flight.contains(&offset)
        {
            state.lost = true;
        }
    }

    /// Offsets to commit now: for each partition whose committable offset
    /// moved since the last call, `(partition, offset)`, where `offset` is
    /// Kafka's "next offset to read".
    pub fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut commits = Vec::new();
        for (partition, state) in &mut self.partitions {
            if let Some(offset) = state.committable()
                && state.committed != Some(offset)
            {
                state.committed = Some(offset);
                commits.push((*partition, offset));
            }
        }
        commits
    }

    /// A commit of `offset` failed: it is offered again by the next
    /// [`PartitionOffsets::take_commits`], even if nothing moved since (an
    /// idle partition would otherwise never commit its last records).
    pub fn commit_failed(&mut self, partition: i32, offset: i64) {
        if let Some(state) = self.partitions.get_mut(&partition)
            && state.committed == Some(offset)
        {
            state.committed = None;
        }
    }

    /// The committable offset of every partition, moved or not.
    pub fn committable(&self) -> Vec<(i32, i64)> {
        self.partitions.iter().filter_map(|(partition, state)| state.committable().map(|o| (*partition, o))).collect()
    }

    /// Where to resume reading each partition that lost a record: its
    /// committable offset. The partition's in-flight set is cleared, since
    /// everything from there on will be read again, in a new generation.
    pub fn take_rewinds(&mut self) -> Vec<(i32, i64)> {
        let mut positions = Vec::new();
        for (partition, state) in &mut self.partitions {
            if !state.lost {
                continue;
            }
            if let Some(offset) = state.committable() {
                positions.push((*partition, offset));
                state.in_flight.clear();
                state.next = Some(offset);
            }
            self.generations += 1;
            state.generation = self.generations;
            state.lost = false;
        }
        positions
    }

    /// Records in flight in `partition` worth waiting for before its
    /// commit: none once one of them was lost, since no commit can pass a
    /// lost record until the partition is read again.
    pub fn awaited(&self, partition: i32) -> usize {
        self.partitions.get(&partition).filter(|state| !state.lost).map_or(0, |state| state.in_flight.len())
    }

    pub fn total_in_flight(&self) -> usize {
        self.partitions.values().map(|state| state.in_flight.len()).sum()
    }

    /// Forgets a partition that was revoked or lost.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

/// A partition's lag: records from the group's position to the high
/// watermark. The position is the committed offset when there is one, else
/// the low watermark (everything still to read). None while the high
/// watermark is unknown (librdkafka's statistics say -1 until a fetch).
pub fn partition_lag(high: i64, low: i64, committed: Option<i64>) -> Option<i64> {
    if high < 0 {
        return None;
    }
    let position = committed.filter(|offset| *offset >= 0).unwrap_or(low.max(0));
    Some((high - position).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut tracker = PartitionOffsets::default();
        tracker.read(0, 10);
        tracker.durable(0, 10);
        assert_eq!(tracker.take_commits(), [(0, 11)]);
        assert_eq!(tracker.take_commits(), [], "nothing moved");
        tracker.commit_failed(0, 11);
        assert_eq!(tracker.take_commits(), [(0, 11)], "offered again");
        tracker.read(0, 11);
        tracker.commit_failed(0, 11);
        tracker.durable(0, 11);
        assert_eq!(tracker.take_commits(), [(0, 12)], "a later offset supersedes it");
        tracker.commit_failed(0, 11);
        assert_eq!(tracker.take_commits(), [], "a stale failure changes nothing");
    }

    #[test]
    fn lag_counts_from_the_commit_or_from_the_start() {
        assert_eq!(partition_lag(-1, -1, None), None, "nothing fetched yet");
        assert_eq!(partition_lag(0, 0, None), Some(0), "an empty, idle partition");
        assert_eq!(partition_lag(100, 0, Some(100)), Some(0), "all committed");
        assert_eq!(partition_lag(100, 0, Some(40)), Some(60));
        assert_eq!(partition_lag(100, 20, None), Some(80), "nothing committed: from the low watermark");
        assert_eq!(partition_lag(100, 20, Some(-1001)), Some(80), "librdkafka's 'invalid' offset");
        assert_eq!(partition_lag(10, 0, Some(12)), Some(0), "never negative");
    }

    #[test]
    fn nothing_read_means_nothing_to_commit() {
        assert!(PartitionOffsets::default().take_commits().is_empty());
    }

    #[test]
    fn the_commit_stops_at_the_first_record_in_flight() {
        let mut tracker = PartitionOffsets::default();
        for offset in 10..15 {
            tracker.read(0, offset);
        }
        tracker.durable(0, 11);
        tracker.durable(0, 12);
        assert_eq!(tracker.take_commits(), [(0, 10)], "10 is still in flight");
        assert_eq!(tracker.take_commits(), [], "an unchanged offset is not committed twice");
        tracker.durable(0, 10);
        assert_eq!(tracker.take_commits(), [(0, 13)]);
        tracker.durable(0, 14);
        tracker.durable(0, 13);
        assert_eq!(tracker.take_commits(), [(0, 15)], "one past the last record read");
        assert_eq!(tracker.awaited(0), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = PartitionOffsets::default();
        tracker.read(0, 0);
        tracker.read(1, 7);
        tracker.durable(1, 7);
        assert_eq!(tracker.take_commits(), [(0, 0), (1, 8)]);
        assert_eq!(tracker.total_in_flight(), 1);
    }

    #[test]
    fn unknown_and_repeated_acks_change_nothing() {
        let mut tracker = PartitionOffsets::default();
        tracker.read(0, 5);
        tracker.durable(0, 99);
        tracker.durable(3, 1);
        assert_eq!(tracker.committable(), [(0, 5)]);
        tracker.durable(0, 5);
        tracker.durable(0, 5);
        assert_eq!(tracker.committable(), [(0, 6)]);
    }

    #[test]
    fn a_loss_rewinds_its_partition_alone_to_the_first_record_not_durable() {
        let mut tracker = PartitionOffsets::default();
        let generation = tracker.read(0, 0);
        for offset in 1..5 {
            assert_eq!(tracker.read(0, offset), generation, "one reading, one generation");
        }
        let other = tracker.read(1, 0);
        assert_ne!(other, generation, "partitions have generations of their own");
        tracker.durable(0, 0);
        tracker.durable(0, 3);
        assert_eq!(tracker.take_rewinds(), [], "nothing lost");
        tracker.lost(0, 2, generation);
        tracker.lost(0, 4, generation);
        assert_eq!(tracker.committable(), [(0, 1), (1, 0)], "a lost record holds the commit back");
        assert_eq!((tracker.awaited(0), tracker.awaited(1)), (0, 1), "a revoke waits for no lost record");
        assert_eq!(tracker.take_rewinds(), [(0, 1)], "one rewind for the partition, however many were lost");
        assert_eq!(tracker.total_in_flight(), 1, "partition 1 keeps its record in flight");
        // Reading again from 1; a late ack of 3 from before the rewind only confirms it.
        let again = tracker.read(0, 1);
        assert_ne!(again, generation);
        tracker.read(0, 2);
        tracker.read(0, 3);
        tracker.durable(0, 3);
        assert_eq!(tracker.committable(), [(0, 1), (1, 0)]);
        // A late loss from the first reading: its records are read again already.
        tracker.lost(0, 2, generation);
        assert_eq!(tracker.take_rewinds(), [], "no second rewind");
        tracker.lost(0, 1, again);
        assert_eq!(tracker.take_rewinds(), [(0, 1)]);
    }

    #[test]
    fn a_loss_of_a_durable_or_forgotten_record_changes_nothing() {
        let mut tracker = PartitionOffsets::default();
        let generation = tracker.read(0, 0);
        tracker.durable(0, 0);
        tracker.lost(0, 0, generation);
        assert_eq!(tracker.take_rewinds(), []);
        let generation = tracker.read(2, 5);
        tracker.forget(2);
        tracker.lost(2, 5, generation);
        assert_eq!(tracker.take_rewinds(), []);
        assert_ne!(tracker.read(2, 5), generation, "a partition assigned again reads in a new generation");
    }

    #[test]
    fn a_forgotten_partition_is_not_committed() {
        let mut tracker = PartitionOffsets::default();
        tracker.read(2, 0);
        tracker.forget(2);
        assert!(tracker.take_commits().is_empty());
    }
}
