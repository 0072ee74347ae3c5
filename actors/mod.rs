//! The supervised actix pipeline, one file per actor:
//!
//! ```text
//! KafkaReader ─┐                      ┌─> DbWriter ──> PostgreSQL
//!              ├─> Buffer ─> PredictClient
//! CsvLoader ───┘                      └─> DlqPublisher ──> Kafka DLQ
//!                                Backfill: predicts stored transactions that have none
//!                                Repredictor: runs re-predictions into prediction_history
//!                  DbWriter ─> ShadowScorer: a candidate model on sampled stored flushes
//! ```
//!
//! Each record carries an [`acknowledgement::Ack`] from its source to the
//! stage that settles it, which reports straight back to the source's own
//! tracker; a record dropped on the way (a crash) reports its loss the same
//! way, and its source reads it again. [`supervisor`] starts every actor on
//! an arbiter of its own, with parameters of its own built from the
//! [`system`]'s resources, and revives one that panicked.
//!
//! The pipeline's memory is bounded ([`capacity`]): every record read takes
//! a share, held by its handle until it is settled or dropped. When none is
//! left, sources pause (backpressure).

pub mod acknowledgement;
pub mod backfill;
pub mod buffer;
pub mod capacity;
pub mod csv_loader;
pub mod db_writer;
pub mod dlq_publisher;
pub mod kafka_reader;
pub mod mailbox;
pub mod messages;
pub mod predict_client;
pub mod prediction_fan_out;
pub mod repredictor;
pub mod shadow_scorer;
pub mod supervisor;
pub mod system;

pub use mailbox::Mailbox;
pub use supervisor::ACTOR_NAMES;
pub use system::{ActorSystem, instance_name};
