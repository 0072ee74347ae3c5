//! The read loop: records in, as many at once as are fetched, each with
//! its share of the capacity; paused partitions while there is none, or
//! while the schema registry cannot answer; rewinds after a loss.

use rdkafka::Offset;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Reader;
use super::ReaderParams;
use super::decode::{Next, READ_BATCH, READ_PASS_MAX_BYTES, ReadPass, message_bytes};
use crate::actors::capacity::Reserved;
use crate::config::ValueFormat;
use crate::domain::backoff::Backoff;
use crate::domain::wire_format::{self, Framing};
use crate::kafka::schema_registry::SchemaRegistry;
use crate::observability::metrics::{self, METRICS, Phase, StageTimer};

/// Reads until stopped or an unrecoverable error.
pub(super) async fn read_loop(
    params: Arc<ReaderParams>,
    next: Next,
    consumer: Arc<Reader>,
    registry: Option<Arc<SchemaRegistry>>,
) -> anyhow::Result<()> {
    let topic = params.kafka.topic.clone();
    let offsets = consumer.context().offsets.clone();
    // Records received while the partitions were paused, read first.
    let mut carried: std::collections::VecDeque<OwnedMessage> = Default::default();
    loop {
        if params.stopping.is_set() {
            return Ok(());
        }
        let rewinds = offsets.lock().take_rewinds();
        if !rewinds.is_empty() {
            carried.retain(|message| rewinds.iter().all(|(partition, _)| *partition != message.partition()));
            rewind(&consumer, &topic, rewinds)?;
        }
        let mut messages: Vec<OwnedMessage> = carried.drain(..).collect();
        if messages.is_empty() {
            let _idle = StageTimer::start(metrics::Stage::Read, Phase::Idle);
            tokio::select! {
                received = consumer.recv() => match received {
                    Ok(message) => messages.push(message.detach()),
                    Err(error) => {
                        crate::kafka::warn_consumer_error(&error, "consumer error");
                        continue;
                    }
                },
                // A record was lost: rewind now, even if nothing arrives.
                () = offsets.losses.notified() => continue,
            }
        }
        // Take what else is already fetched, without waiting, so that one
        // message to the Buffer carries many records. The records in hand
        // are bounded in bytes too, headers included: a header is dropped
        // after this pass, but held until then.
        let mut in_hand: usize = messages.iter().map(message_bytes).sum();
        while messages.len() < READ_BATCH && in_hand < READ_PASS_MAX_BYTES {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(message)) => {
                    let message = message.detach();
                    in_hand += message_bytes(&message);
                    messages.push(message);
                }
                _ => break,
            }
        }
        if let Some(registry) = &registry
            && !fetch_schemas(&params, &consumer, registry, &messages, &mut carried).await?
        {
            return Ok(());
        }
        let mut pass = ReadPass::new(registry.as_deref());
        let mut messages = messages.into_iter();
        while let Some(message) = messages.next() {
            // A partition revoked since this was fetched is someone else's now.
            if !consumer.context().holds(message.partition()) {
                continue;
            }
            // The permit is taken once a record is in hand, so an idle reader
            // holds none. It counts what the record keeps: its value, its
            // key and its traceparent.
            let traceparent = crate::kafka::traceparent_of(&message);
            let bytes = message.payload().map_or(0, <[u8]>::len)
                + message.key().map_or(0, <[u8]>::len)
                + traceparent.as_ref().map_or(0, String::len);
            let permit = match params.capacity.try_reserve(bytes) {
                Some(permit) => permit,
                None => {
                    pass.send(&next).await;
                    let waiting = Instant::now();
                    tracing::debug!(in_flight = params.capacity.in_flight(), "capacity full: reading waits");
                    // What was fetched before the pause goes on after
                    // this record, before anything received meanwhile.
                    carried.extend(messages.by_ref());
                    let permit = wait_paused(&params, &consumer, bytes, &mut carried).await?;
                    pass.waited += waiting.elapsed();
                    // Revoked during the wait: the permit goes back.
                    if consumer.context().holds(message.partition()) {
                        pass.add(&params, &offsets, &message, traceparent, permit);
                    }
                    break;
                }
            };
            pass.add(&params, &offsets, &message, traceparent, permit);
        }
        pass.send(&next).await;
        pass.observe();
    }
}

/// Waits for capacity. A short wait (a flush being written) is waited
/// out without polling: pausing a partition makes librdkafka drop what it
/// has prefetched for it, to be fetched again after the resume. A longer
/// one (a database outage) pauses the held partitions and keeps polling,
/// so that the group membership holds: `max.poll.interval.ms` counts the
/// time between polls. A record that still arrives is carried to the
/// next pass, in order.
pub(super) async fn wait_paused(
    params: &ReaderParams,
    consumer: &Reader,
    bytes: usize,
    carried: &mut std::collections::VecDeque<OwnedMessage>,
) -> anyhow::Result<Reserved> {
    if let Ok(permit) = tokio::time::timeout(PAUSE_AFTER, params.capacity.reserve(bytes)).await {
        return Ok(permit);
    }
    let paused = consumer.assignment()?;
    consumer.pause(&paused)?;
    tracing::info!(
        partitions = paused.count(),
        in_flight = params.capacity.in_flight(),
        "capacity full: partitions paused"
    );
    let reserve = params.capacity.reserve(bytes);
    tokio::pin!(reserve);
    let permit = loop {
        tokio::select! {
            permit = &mut reserve => break permit,
            received = consumer.recv() => match received {
                Ok(message) => carried.push_back(message.detach()),
                Err(error) => crate::kafka::warn_consumer_error(&error, "consumer error while paused"),
            },
        }
    };
    // Resume what is still held: a rebalance meanwhile may have changed it.
    let held = consumer.assignment()?;
    consumer.resume(&held)?;
    tracing::info!(partitions = held.count(), "capacity back: partitions resumed");
    Ok(permit)
}

/// Fetches the schemas that the records in hand are framed for and that
/// are not known yet, so that each record is then read without waiting.
/// While the registry cannot answer, no record is at fault: the held
/// partitions are paused and polled (as while capacity is full), and the
/// fetch is tried again with backoff, for as long as it takes. Returns
/// false when the service stops meanwhile.
pub(super) async fn fetch_schemas(
    params: &ReaderParams,
    consumer: &Reader,
    registry: &SchemaRegistry,
    messages: &[OwnedMessage],
    carried: &mut std::collections::VecDeque<OwnedMessage>,
) -> anyhow::Result<bool> {
    if params.kafka.value_format == ValueFormat::Json {
        return Ok(true);
    }
    let unknown: std::collections::BTreeSet<u32> = messages
        .iter()
        .filter_map(|message| match wire_format::framing(message.payload().unwrap_or_default()) {
            Ok(Framing::Framed { schema_id, .. }) => Some(schema_id),
            _ => None,
        })
        .filter(|id| registry.cached(*id).is_none())
        .collect();
    let mut paused: Option<Instant> = None;
    let mut backoff = Backoff::outage();
    for id in unknown {
        loop {
            if params.stopping.is_set() {
                return Ok(false);
            }
            let unavailable = match registry.fetch(id).await {
                Ok(_) => break,
                Err(unavailable) => unavailable,
            };
            if paused.is_none() {
                consumer.pause(&consumer.assignment()?)?;
                paused = Some(Instant::now());
            }
            METRICS.schema_registry_unavailable.inc();
            let delay = backoff.next_delay();
            crate::kafka::warn_repeated(&format!("{unavailable}; reading waits for it (schema id {id})"));
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    received = consumer.recv() => match received {
                        Ok(message) => carried.push_back(message.detach()),
                        Err(error) => crate::kafka::warn_consumer_error(&error, "consumer error while paused"),
                    },
                }
            }
        }
    }
    if let Some(since) = paused {
        consumer.resume(&consumer.assignment()?)?;
        tracing::info!(waited_s = since.elapsed().as_secs(), "the schema registry answers again: partitions resumed");
    }
    Ok(true)
}

/// How long the reader waits for capacity before it pauses its
/// partitions; far below `max.poll.interval.ms` (5 minutes by default).
pub(super) const PAUSE_AFTER: Duration = Duration::from_secs(2);

/// Seeks each partition that lost a record back to its first record that
/// is not durable.
pub(super) fn rewind(consumer: &Reader, topic: &str, positions: Vec<(i32, i64)>) -> anyhow::Result<()> {
    tracing::info!(?positions, "records were lost in flight: reading again from the first not yet durable");
    for (partition, offset) in positions {
        seek(consumer, topic, partition, offset)?;
    }
    Ok(())
}

pub(super) fn seek(consumer: &Reader, topic: &str, partition: i32, offset: i64) -> anyhow::Result<()> {
    consumer
        .seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot seek {topic}/{partition} to {offset}: {e}"))?;
    Ok(())
}
