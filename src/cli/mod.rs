//! The commands besides `txnflow run` (the service), one file each; the
//! argument parsing is in `main.rs`.

pub mod batch;
pub mod check;
pub mod dlq_replay;
pub mod models;
pub mod produce;
pub mod repredict;
