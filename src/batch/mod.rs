//! Batch runs: the CsvLoader actor drives a run; these modules hold its
//! I/O and state, one concept each:
//! - [`input`]: where a run's files are, checked before any row moves;
//! - [`rows`]: a file's rows as a stream, each bounded in size;
//! - [`error_file`]: where invalid rows go;
//! - [`runs`]: the registry of runs that `GET /batches/<run_id>` reports.

mod error_file;
mod input;
mod rows;
mod runs;

pub use error_file::*;
pub use input::*;
pub use rows::*;
pub use runs::*;
