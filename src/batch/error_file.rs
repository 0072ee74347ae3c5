//! Where invalid rows go: an error file per input file, written locally
//! as rows come and uploaded beside the input when the file is done.

use std::path::PathBuf;

use super::input::{InputFile, Location, RunSpec};

/// The invalid rows of one input file: written to a local file as they come
/// (constant memory), then uploaded when the file is done.
pub struct ErrorFile {
    pub destination: Location,
    staging: PathBuf,
    writer: Option<csv::Writer<std::fs::File>>,
    delimiter: u8,
    header: Vec<String>,
}

impl ErrorFile {
    pub fn new(spec: &RunSpec, file: &InputFile) -> ErrorFile {
        let destination = spec.error_location(file);
        let staging = match &destination {
            Location::Local(path) => path.clone(),
            Location::S3 { .. } => std::env::temp_dir().join(format!(
                "txnflow-errors-{}-{}.csv",
                spec.run_id,
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, file.uri.as_bytes()).simple()
            )),
        };
        ErrorFile { destination, staging, writer: None, delimiter: file.delimiter, header: file.layout.headers.clone() }
    }

    /// Appends one invalid row: its original fields (empty ones when none
    /// are given: a row too large to keep), then `line` and `error`.
    pub fn record(&mut self, fields: &[Vec<u8>], line: u64, error: &str) -> std::io::Result<()> {
        if self.writer.is_none() {
            if let Some(parent) = self.staging.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // Appends: a resumed run keeps what an earlier pass recorded.
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&self.staging)?;
            let empty = file.metadata()?.len() == 0;
            let mut writer = csv::WriterBuilder::new().delimiter(self.delimiter).flexible(true).from_writer(file);
            if empty {
                let mut header: Vec<&[u8]> = self.header.iter().map(|h| h.as_bytes()).collect();
                header.extend([b"line".as_slice(), b"error".as_slice()]);
                writer.write_record(header)?;
            }
            self.writer = Some(writer);
        }
        let writer = self.writer.as_mut().expect("opened above");
        let line = line.to_string();
        let blanks = if fields.is_empty() { self.header.len() } else { 0 };
        let record = fields
            .iter()
            .map(Vec::as_slice)
            .chain(std::iter::repeat_n(b"".as_slice(), blanks))
            .chain([line.as_bytes(), error.as_bytes()]);
        writer.write_record(record)?;
        Ok(())
    }

    /// Removes what an earlier run of the same run id left, so that a
    /// re-run's error file holds its own rows only (a pass resumed within
    /// one run appends, and does not call this).
    pub fn reset(&self) {
        let _ = std::fs::remove_file(&self.staging);
    }

    /// Whether any row was recorded (in this process or an earlier pass).
    pub fn has_rows(&self) -> bool {
        self.writer.is_some() || self.staging.exists()
    }

    /// Deletes an S3 error file an earlier run of this run id uploaded
    /// (best effort: a leftover file is harmless, only misleading).
    pub async fn remove_stale(self, s3: &aws_sdk_s3::Client) {
        if let Location::S3 { bucket, key } = &self.destination {
            let _ = s3.delete_object().bucket(bucket).key(key).send().await;
        }
    }

    /// Flushes, and uploads an S3 destination. Returns its uri.
    pub async fn finish(mut self, s3: &aws_sdk_s3::Client) -> Result<String, String> {
        if let Some(mut writer) = self.writer.take() {
            writer.flush().map_err(|e| e.to_string())?;
        }
        let uri = self.destination.uri();
        if let Location::S3 { bucket, key } = &self.destination {
            let body = aws_sdk_s3::primitives::ByteStream::from_path(&self.staging).await.map_err(|e| e.to_string())?;
            s3.put_object()
                .bucket(bucket)
                .key(key)
                .content_type("text/csv")
                .body(body)
                .send()
                .await
                .map_err(|e| format!("cannot upload {uri}: {}", e.into_service_error()))?;
            let _ = std::fs::remove_file(&self.staging);
        }
        Ok(uri)
    }
}
