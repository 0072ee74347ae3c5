//! Supervision: one table of the actors drives their start, their revival
//! after a panic, the restart metric and the chaos hooks.
//!
//! Every actor runs on an arbiter (thread) of its own under an actix
//! `Supervisor`, so an actor that fails through its error path is restarted
//! in place (its `Supervised::restarting` counts it). One that panics takes
//! only its own thread down: the watchdog here sees its closed mailbox and
//! starts it again. Either way, the records the actor held are dropped, and
//! their handles tell their sources to read them again.

use actix::{Actor, Arbiter, ArbiterHandle, Context, Recipient, Supervised, Supervisor};
use std::sync::Arc;
use std::time::Duration;

use super::messages::Chaos;
use super::system::{ActorSystem, Mailboxes};
use super::{
    Mailbox, backfill, buffer, csv_loader, db_writer, dlq_publisher, kafka_reader, predict_client, repredictor,
    shadow_scorer,
};
use crate::observability::metrics::METRICS;

/// One supervised actor: its name (in logs, metrics and the chaos
/// endpoint), how to start it, and when it is revived.
struct Entry {
    name: &'static str,
    /// Starts it under its name.
    start: fn(&Arc<ActorSystem>, &'static str) -> Started,
    /// Revived while the service shuts down too (to finish what is in
    /// flight); the reader is not, since it stops reading then.
    revive_in_shutdown: bool,
}

/// A started actor: its chaos hook (whose mailbox tells whether it still
/// runs) and its arbiter. Its mailbox points at it.
struct Started {
    chaos: Recipient<Chaos>,
    arbiter: ArbiterHandle,
}

/// The actors, in start order: each one's next stages are started before
/// it, and it is wired with their mailboxes. Each gets its own parameters,
/// built here from the system's resources: what an actor holds is what this
/// table gives it.
const ACTORS: [Entry; 9] = [
    entry("dlq_publisher", |s, name| {
        let make = |s: Arc<ActorSystem>| {
            let params = dlq_publisher::DlqPublisherParams {
                topic: s.config.kafka.dlq_topic.clone(),
                producer: s.producer.clone(),
                pool: s.pool.clone(),
            };
            dlq_publisher::DlqPublisher::new(params)
        };
        start(s, name, make, |m| &m.dlq_publisher)
    }),
    entry("shadow_scorer", |s, name| {
        let make = |s: Arc<ActorSystem>| {
            shadow_scorer::ShadowScorer::new(shadow_scorer::ShadowScorerParams {
                predict: s.config.predict.clone(),
                breaker: s.config.breaker.clone(),
                db: s.config.db.clone(),
            })
        };
        start(s, name, make, |m| &m.shadow_scorer)
    }),
    entry("db_writer", |s, name| {
        let make = |s: Arc<ActorSystem>| {
            let params = db_writer::DbWriterParams {
                pool: s.pool.clone(),
                write_method: s.config.db.write_method,
                stored_unpredicted: s.stored_unpredicted.clone(),
                fan_out: s.fan_out.clone(),
                shadow_sampler: s.shadow_sampler.clone(),
                shadow_scorer: s.mailboxes.shadow_scorer.clone(),
            };
            db_writer::DbWriter::new(params, s.mailboxes.dlq_publisher.clone())
        };
        start(s, name, make, |m| &m.db_writer)
    }),
    entry("predict_client", |s, name| {
        let make =
            |s: Arc<ActorSystem>| predict_client::PredictClient::new(s.ml.clone(), s.mailboxes.db_writer.clone());
        start(s, name, make, |m| &m.predict_client)
    }),
    entry("buffer", |s, name| {
        let make = |s: Arc<ActorSystem>| buffer::Buffer::new(&s.config.buffer, s.mailboxes.predict_client.clone());
        start(s, name, make, |m| &m.buffer)
    }),
    entry("backfill", |s, name| {
        let make = |s: Arc<ActorSystem>| {
            backfill::Backfill::new(backfill::BackfillParams {
                predict: s.config.predict.clone(),
                backfill: s.config.backfill.clone(),
                pool: s.pool.clone(),
                ml: s.ml.clone(),
                fan_out: s.fan_out.clone(),
                stored_unpredicted: s.stored_unpredicted.clone(),
                stopping: s.stopping.clone(),
            })
        };
        start(s, name, make, |m| &m.backfill)
    }),
    entry("repredictor", |s, name| {
        let make = |s: Arc<ActorSystem>| {
            repredictor::Repredictor::new(repredictor::RepredictorParams {
                config: s.config.clone(),
                ml: s.ml.clone(),
                instance: s.instance.clone(),
                stopping: s.stopping.clone(),
            })
        };
        start(s, name, make, |m| &m.repredictor)
    }),
    entry("csv_loader", |s, name| {
        let make = |s: Arc<ActorSystem>| {
            let params = csv_loader::CsvLoaderParams {
                batch: s.config.batch.clone(),
                s3: s.config.s3.clone(),
                capacity: s.capacity.clone(),
                stopping: s.stopping.clone(),
                recorder: s.run_recorder(),
            };
            csv_loader::CsvLoader::new(params, s.mailboxes.buffer.clone())
        };
        start(s, name, make, |m| &m.csv_loader)
    }),
    Entry {
        revive_in_shutdown: false,
        ..entry("kafka_reader", |s, name| {
            let make = |s: Arc<ActorSystem>| {
                let params = kafka_reader::ReaderParams {
                    kafka: s.config.kafka.clone(),
                    schema_registry: s.config.schema_registry.clone(),
                    capacity: s.capacity.clone(),
                    stopping: s.stopping.clone(),
                };
                kafka_reader::KafkaReader::new(params, s.mailboxes.buffer.clone(), s.mailboxes.dlq_publisher.clone())
            };
            start(s, name, make, |m| &m.kafka_reader)
        })
    },
];

const fn entry(name: &'static str, start: fn(&Arc<ActorSystem>, &'static str) -> Started) -> Entry {
    Entry { name, start, revive_in_shutdown: true }
}

/// The actors' names, as the chaos endpoint and the restart metric name them.
pub const ACTOR_NAMES: [&str; ACTORS.len()] = {
    let mut names = [""; ACTORS.len()];
    let mut index = 0;
    while index < ACTORS.len() {
        names[index] = ACTORS[index].name;
        index += 1;
    }
    names
};

/// The actors running now, each with its chaos hook.
#[derive(Default)]
pub struct Running {
    actors: Vec<(&'static Entry, Recipient<Chaos>)>,
    arbiters: Vec<ArbiterHandle>,
}

/// Starts an actor under a supervisor on an arbiter of its own, made by
/// `make` (which wires it with its next stages' mailboxes), and points its
/// own mailbox, `mailbox`, at it.
fn start<A>(
    system: &Arc<ActorSystem>,
    name: &'static str,
    make: fn(Arc<ActorSystem>) -> A,
    mailbox: fn(&Mailboxes) -> &Mailbox<A>,
) -> Started
where
    A: Actor<Context = Context<A>> + Supervised + actix::Handler<Chaos>,
{
    let arbiter = Arbiter::new();
    let handle = arbiter.handle();
    // The thread runs this actor alone, so a span entered on it for good
    // names the actor in every log line it writes (`actor` field), without
    // a span in each handler. Runs before the actor starts: an arbiter runs
    // what it is given in order. The guard is never dropped.
    handle.spawn_fn(move || std::mem::forget(tracing::info_span!("actor", actor = name).entered()));
    let shared = system.clone();
    let addr = Supervisor::start_in_arbiter(&handle, move |_| make(shared));
    system.threads.lock().expect("threads lock").push(arbiter);
    let chaos = addr.clone().recipient();
    mailbox(&system.mailboxes).point_to(addr);
    Started { chaos, arbiter: handle }
}

/// Starts every actor (the reader only when `read_kafka`), then the
/// watchdog that revives them.
pub fn start_all(system: &Arc<ActorSystem>, read_kafka: bool) {
    for entry in ACTORS.iter().filter(|entry| read_kafka || entry.name != "kafka_reader") {
        METRICS.actor_restarts.with_label_values(&[entry.name]);
        let started = (entry.start)(system, entry.name);
        let mut running = system.running.lock().expect("running lock");
        running.actors.push((entry, started.chaos));
        running.arbiters.push(started.arbiter);
    }
    let system = system.clone();
    actix::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(200));
        loop {
            ticker.tick().await;
            revive_panicked(&system);
        }
    });
}

/// Starts again every actor whose mailbox closed: a panic ended its thread.
fn revive_panicked(system: &Arc<ActorSystem>) {
    let ended: Vec<&'static Entry> = {
        let running = system.running.lock().expect("running lock");
        running.actors.iter().filter(|(_, chaos)| !chaos.connected()).map(|(entry, _)| *entry).collect()
    };
    for entry in ended {
        if !entry.revive_in_shutdown && system.stopping.is_set() {
            continue;
        }
        let started = (entry.start)(system, entry.name);
        {
            let mut running = system.running.lock().expect("running lock");
            if let Some(slot) = running.actors.iter_mut().find(|(e, _)| e.name == entry.name) {
                slot.1 = started.chaos;
            }
            running.arbiters.push(started.arbiter);
        }
        restarted(entry.name, "its mailbox closed (panic)");
    }
}

/// An actor restarted: count it once. The records it held were dropped
/// with it, and their handles reported them lost.
pub fn restarted(actor: &'static str, why: &str) {
    METRICS.actor_restarts.with_label_values(&[actor]).inc();
    tracing::warn!(actor, why, "actor restarted; the records it held are read again");
}

/// Sends a chaos hook to the actor named `actor`; false when none runs.
pub fn chaos(system: &ActorSystem, actor: &str, chaos: Chaos) -> bool {
    let running = system.running.lock().expect("running lock");
    match running.actors.iter().find(|(entry, _)| entry.name == actor) {
        Some((_, hook)) => {
            hook.do_send(chaos);
            true
        }
        None => false,
    }
}

/// Stops every arbiter (after a graceful shutdown) and waits, at most
/// `wait`, for their threads to end, so that the actors and the clients
/// they hold are gone before the process ends.
pub fn stop_all(system: &ActorSystem, wait: Duration) {
    for arbiter in &system.running.lock().expect("running lock").arbiters {
        arbiter.stop();
    }
    let threads = std::mem::take(&mut *system.threads.lock().expect("threads lock"));
    let (done, joined) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for thread in threads {
            // A thread a panic ended joins with an error: nothing to do.
            let _ = thread.join();
        }
        let _ = done.send(());
    });
    let started = std::time::Instant::now();
    match joined.recv_timeout(wait) {
        Ok(()) => tracing::debug!(took = ?started.elapsed(), "actor threads ended"),
        Err(_) => tracing::warn!(?wait, "actor threads still running at exit"),
    }
}

/// The chaos hook every actor answers (`impl Handler<Chaos>`): `Crash`
/// fails through the error path (the supervisor restarts the actor in
/// place), `Panic` panics (the watchdog revives it).
macro_rules! chaos_hook {
    ($actor:ty, $name:literal) => {
        impl actix::Handler<$crate::actors::messages::Chaos> for $actor {
            type Result = ();

            fn handle(&mut self, chaos: $crate::actors::messages::Chaos, ctx: &mut actix::Context<Self>) {
                $crate::actors::supervisor::apply_chaos($name, chaos, ctx);
            }
        }
    };
}
pub(crate) use chaos_hook;

pub fn apply_chaos<A: Actor<Context = Context<A>>>(actor: &'static str, chaos: Chaos, ctx: &mut Context<A>) {
    use actix::ActorContext;
    match chaos {
        Chaos::Crash => {
            tracing::warn!(actor, "chaos: crashing through the error path");
            ctx.stop();
        }
        Chaos::Panic => {
            tracing::warn!(actor, "chaos: panicking in a handler");
            panic!("chaos: {actor} panics in a handler");
        }
    }
}
