//! The local test broker's bugs, worked around only with
//! `kafka.broker_quirks = "tansu"`, so that the reader's path for a real
//! Kafka stays clean. Tansu 0.6, as observed here:
//!
//! - a fetch that starts inside a record batch returns the *next* batch
//!   (fetching a 10-record batch from its offset 5 returned offsets 10 and
//!   up), so a resumed partition, or a start at a committed offset, can
//!   skip records: the reader never pauses, and after a start it checks the
//!   first record and seeks back [`GAP_REWIND`] offsets when it skipped;
//! - a start inside a partition's *last* batch gets no record at all, so
//!   the first-record check never runs: a start that has seen no record for
//!   [`START_SILENCE`] reads again from [`GAP_REWIND`] offsets back, once;
//! - ListOffsets "earliest" answered a later offset while records were
//!   appended, so partitions are assigned at explicit offsets: the
//!   committed one, or 0 / the end as `kafka.auto_offset_reset` says;
//! - a fetch answer fills its byte limit with the request's first
//!   partitions, beyond `max.partition.fetch.bytes`, so at the reader's
//!   4 MiB prefetch (librdkafka caps a fetch at `queued.max.messages.kbytes`)
//!   a backlog was read partition after partition: the reader prefetches
//!   [`PREFETCH_KBYTES`] instead, which lets a fetch hold every partition.

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

/// The reader's prefetch (`queued.max.messages.kbytes`) on Tansu. With
/// 300,000 events on 3 partitions, 4 MiB read partitions 0 and 1, then 2;
/// 8 MiB still started partition 2 seconds late; 16 MiB read all three
/// side by side, for about 25 MB more RSS.
pub const PREFETCH_KBYTES: &str = "16384";

/// How far back a read that started mid-batch steps to find a batch start.
pub const GAP_REWIND: i64 = 10_000;

/// How long a start may see no record before it is taken for a start
/// inside the partition's last batch. A partition that is merely idle is
/// read again from [`GAP_REWIND`] back once: harmless, as writes are
/// idempotent.
pub const START_SILENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Sets an explicit start offset on every partition of `tpl`: the group's
/// committed one, or, without a commit (or when it cannot be read), 0 for
/// "earliest" and the end for "latest". Returns the committed offsets as
/// read, and the explicit starts, to check the first record against.
pub fn explicit_start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &mut TopicPartitionList,
    auto_offset_reset: &str,
) -> (KafkaResult<TopicPartitionList>, Vec<(i32, i64)>) {
    let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10));
    let mut starts = Vec::new();
    for element in tpl.clone().elements() {
        let start =
            committed.as_ref().ok().and_then(|c| c.find_partition(element.topic(), element.partition())).and_then(
                |c| match c.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            );
        let start = match start {
            Some(offset) => Some(offset),
            None if auto_offset_reset == "latest" => None,
            None => Some(0),
        };
        let _ =
            tpl.set_partition_offset(element.topic(), element.partition(), start.map_or(Offset::End, Offset::Offset));
        if let Some(start) = start {
            starts.push((element.partition(), start));
        }
    }
    if let Err(error) = &committed {
        tracing::warn!(%error, "cannot read committed offsets; starting as kafka.auto_offset_reset says");
    }
    (committed, starts)
}

/// Where to seek back to when the first record after a start at `start`
/// is `first` (beyond it: the broker skipped records), unless that start was
/// already rewound once; None when the record may be used.
pub fn seek_back(start: i64, first: i64, already_rewound: bool) -> Option<i64> {
    (first > start && !already_rewound).then(|| back_from(start))
}

/// Where a start that saw no record for [`START_SILENCE`] reads again
/// from, unless it was already rewound once or there is nothing before it.
pub fn silent_start_back(start: i64, already_rewound: bool) -> Option<i64> {
    (start > 0 && !already_rewound).then(|| back_from(start))
}

fn back_from(start: i64) -> i64 {
    (start - GAP_REWIND).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_skipped_by_the_broker_is_read_again_once() {
        assert_eq!(seek_back(100, 100, false), None, "the record it started at");
        assert_eq!(seek_back(100, 90, false), None, "before it, after a seek back");
        assert_eq!(seek_back(15_000, 15_010, false), Some(5_000));
        assert_eq!(seek_back(50, 60, false), Some(0));
        assert_eq!(seek_back(50, 60, true), None, "once only");
    }

    #[test]
    fn a_silent_start_is_read_again_once_from_further_back() {
        assert_eq!(silent_start_back(15_000, false), Some(5_000));
        assert_eq!(silent_start_back(50, false), Some(0));
        assert_eq!(silent_start_back(0, false), None, "nothing before it");
        assert_eq!(silent_start_back(15_000, true), None, "once only");
    }
}
