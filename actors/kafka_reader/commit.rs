//! Sending commits: what the offsets allow, for the partitions held.

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

use super::Reader;
use super::offsets::Commits;
use crate::observability::metrics::{self, Phase, StageTimer};
use crate::observability::spans::CommitSpan;

/// How often a failed commit is offered again, and the assignment watched.
pub(super) const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// The least time between two commits that follow progress: a busy reader
/// commits at most this often, an idle one as soon as its records settle.
pub(super) const COMMIT_SPACING: Duration = Duration::from_millis(200);

/// Commits every offset whose records are all durable: those that moved
/// since the last commit, or all of them (synchronously at shutdown and on
/// a restart, asynchronously every [`RECOMMIT_EVERY`](super::RECOMMIT_EVERY) ticks).
pub(super) fn commit(consumer: &Reader, commits: Commits) {
    let context = consumer.context();
    let mode = if matches!(commits, Commits::AllNow) { CommitMode::Sync } else { CommitMode::Async };
    let topic = &context.params.kafka.topic;
    let mut list = TopicPartitionList::new();
    for (partition, offset) in context.offsets.to_commit(commits, |partition| context.holds(partition)) {
        let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    if list.count() == 0 {
        return;
    }
    let group = &context.params.kafka.group_id;
    let span = CommitSpan::start(topic, group, list.count(), matches!(mode, CommitMode::Sync));
    let committed = consumer.commit(&list, mode);
    span.end(committed.is_err());
    if let Err(error) = committed {
        tracing::warn!(%error, "offset commit failed; it is retried on the next tick");
    }
}

/// Commits as the handles report records durable, at most every
/// [`COMMIT_SPACING`].
pub(super) async fn commit_on_progress(consumer: Arc<Reader>) {
    loop {
        consumer.context().offsets.progress.notified().await;
        let working = StageTimer::start(metrics::Stage::Commit, Phase::Work);
        commit(&consumer, Commits::Moved);
        drop(working);
        tokio::time::sleep(COMMIT_SPACING).await;
    }
}
