//! The ML prediction API: the client the pipeline asks, its circuit
//! breaker, and the reference server with its fault knobs.

mod answer_body;
pub mod breaker;
pub mod client;
pub mod reference_api;
mod request_slots;
