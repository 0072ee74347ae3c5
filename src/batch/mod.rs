//! Batch runs: the CsvLoader actor drives a run; these modules hold its
//! I/O and state, one concept each:
//! - [`input`]: where a run's files are, checked before any row moves;
//! - [`rows`]: a file's rows as a stream, each bounded in size;
//! - [`error_file`]: where invalid rows go;
//! - [`runs`]: the registry of runs that `GET /batches/<run_id>` reports;
//! - [`s3`]: the S3 client that reads the objects.

mod error_file;
mod input;
mod rows;
mod runs;
pub mod s3;

pub use error_file::*;
pub use input::*;
pub use rows::*;
pub use runs::*;
