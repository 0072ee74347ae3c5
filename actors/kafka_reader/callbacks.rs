//! librdkafka's callbacks to the reader: its log and errors, the
//! statistics that give the consumer lag, commit results, and rebalances.

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ReadOffsets;
use super::ReaderParams;
use crate::actors::buffer::Buffer;
use crate::actors::mailbox::Mailbox;
use crate::observability::metrics::METRICS;

/// How long a revoke waits for in-flight records before committing what is durable.
pub(super) const REVOKE_WAIT: Duration = Duration::from_secs(10);

/// The consumer's callbacks: rebalances and statistics (consumer lag).
pub struct ReaderContext {
    pub(super) params: Arc<ReaderParams>,
    pub(super) offsets: Arc<ReadOffsets>,
    /// For the flush on a revoke.
    pub(super) buffer: Mailbox<Buffer>,
    /// The partitions this reader holds.
    pub(super) assigned: std::sync::Mutex<std::collections::BTreeSet<i32>>,
}

impl ClientContext for ReaderContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::log_from_librdkafka(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::error_from_librdkafka(&error, reason);
    }

    /// The lag of every partition held, from the high watermark and the
    /// committed offset librdkafka knows.
    fn stats(&self, statistics: Statistics) {
        let topic = &self.params.kafka.topic;
        let Some(stats) = statistics.topics.get(topic) else { return };
        let assigned = self.assigned.lock().expect("assigned lock");
        for partition in assigned.iter() {
            let Some(partition_stats) = stats.partitions.get(partition) else { continue };
            let (high, low) = (partition_stats.hi_offset, partition_stats.lo_offset);
            if let Some(lag) = crate::domain::offsets::partition_lag(high, low, Some(partition_stats.committed_offset))
            {
                METRICS.consumer_lag.with_label_values(&[topic.as_str(), &partition.to_string()]).set(lag);
            }
            if partition_stats.committed_offset >= 0 {
                let committed = &METRICS.consumer_committed_offset;
                committed
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(partition_stats.committed_offset);
            }
        }
    }
}

impl ConsumerContext for ReaderContext {
    /// Assigns the partitions: librdkafka starts each at the group's
    /// committed offset (reading it again until it can), or as
    /// `auto.offset.reset` says when there is none.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.hold(tpl);
                tracing::info!(assigned = ?tpl.elements().iter().map(|e| (e.partition(), e.offset())).collect::<Vec<_>>(), "partitions assigned");
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                // The consumer protocol (and a cooperative assignor) hands
                // out only what changes: add it to what is held.
                let assigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
                    _ => consumer.assign(tpl),
                };
                if let Err(error) = assigned {
                    tracing::error!(%error, "assign failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.release(tpl);
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let unassigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
                    _ => consumer.unassign(),
                };
                if let Err(error) = unassigned {
                    tracing::error!(%error, "unassign failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }

    /// An asynchronous commit that failed, as a whole or for a partition,
    /// is offered again on the next tick.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        let mut tracker = self.offsets.lock();
        for element in offsets.elements() {
            let failed = result.as_ref().err().cloned().or_else(|| element.error().err());
            if let (Some(error), Offset::Offset(offset)) = (failed, element.offset()) {
                tracing::warn!(%error, partition = element.partition(), offset, "offset commit failed; it is retried on the next tick");
                tracker.commit_failed(element.partition(), offset);
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?partitions, "partitions revoked: flushing and committing what is durable");
        self.buffer.do_send(crate::actors::messages::FlushNow);
        // Blocking is fine here: this is the reader's own thread.
        let deadline = Instant::now() + REVOKE_WAIT;
        while self.offsets.awaits_any(&partitions) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let topic = self.params.kafka.topic.clone();
        let mut commit = TopicPartitionList::new();
        for (partition, offset) in self.offsets.release(&partitions) {
            let _ = commit.add_partition_offset(&topic, partition, Offset::Offset(offset));
        }
        if commit.count() > 0
            && let Err(error) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(%error, "commit on revoke failed; the next owner re-reads from the last commit");
        }
    }
}

impl ReaderContext {
    /// Whether this reader holds `partition` now.
    pub(super) fn holds(&self, partition: i32) -> bool {
        self.assigned.lock().expect("assigned lock").contains(&partition)
    }

    /// Partitions assigned: their lag is exported from now on, 0 until the
    /// first statistics (every 5 s) say more, so an idle partition shows 0
    /// and the metric is never absent for a partition someone holds.
    pub(super) fn hold(&self, tpl: &TopicPartitionList) {
        let topic = &self.params.kafka.topic;
        let mut assigned = self.assigned.lock().expect("assigned lock");
        for element in tpl.elements() {
            assigned.insert(element.partition());
            METRICS.consumer_lag.with_label_values(&[topic.as_str(), &element.partition().to_string()]).set(0);
        }
    }

    /// Partitions revoked: this reader no longer exports their lag (their
    /// new owner does).
    pub(super) fn release(&self, tpl: &TopicPartitionList) {
        let topic = &self.params.kafka.topic;
        let mut assigned = self.assigned.lock().expect("assigned lock");
        for element in tpl.elements() {
            assigned.remove(&element.partition());
            let labels = [topic.as_str(), &element.partition().to_string()];
            let _ = METRICS.consumer_lag.remove_label_values(&labels);
            let _ = METRICS.consumer_committed_offset.remove_label_values(&labels);
        }
    }
}
