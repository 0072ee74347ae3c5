//! The end of `txnflow run`: the signals that start it, and the drain that
//! makes everything read durable before the process exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::ActorSystem;
use crate::actors::messages::{CommitNow, FlushNow, StopReading};

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Stops reading, flushes, waits for every record in flight, commits.
/// Returns whether everything read became durable in time.
pub async fn shutdown(system: &Arc<ActorSystem>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout.saturating_sub(Duration::from_millis(500));
    system.stopping.set();
    if let Some(reader) = system.kafka_reader() {
        let _ = reader.send(StopReading).await;
    }
    let _ = system.buffer().send(FlushNow).await;
    while system.capacity.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let clean = system.capacity.in_flight() == 0;
    if let Some(reader) = system.kafka_reader() {
        let _ = reader.send(CommitNow).await;
    }
    clean
}
