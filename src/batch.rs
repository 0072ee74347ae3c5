//! Batch inputs (contract §7): where a run's files are, how they are opened
//! and checked before any row moves, where invalid rows go, and the
//! registry of runs that `GET /batches/<run_id>` reports.
//!
//! The CsvLoader actor drives a run; this module holds its I/O and state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aws_sdk_s3::error::ProvideErrorMetadata;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::domain::csv_rules::{CsvLayout, HeaderError, detect_delimiter};
use crate::domain::run_progress::{FileProgress, RowAction, RowKind, RowOutcome, RunCounts};
use crate::domain::transaction::Transaction;
use crate::domain::validation::validate;

/// Why a batch cannot start. Each names the input and the problem; none
/// writes anything.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("bad batch uri {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("bad run id {0:?}: use 1 to 200 characters, without '/', spaces or control characters")]
    BadRunId(String),
    #[error("bucket {bucket:?} does not exist ({uri})")]
    NoSuchBucket { bucket: String, uri: String },
    #[error("{uri} does not exist")]
    NotFound { uri: String },
    #[error("no .csv file under {uri}")]
    NoCsvFiles { uri: String },
    #[error("{uri} is not a CSV file: {reason}")]
    NotCsv { uri: String, reason: String },
    #[error("{uri}: {error}")]
    Header { uri: String, error: HeaderError },
    #[error("cannot read {uri}: {reason}")]
    Unreadable { uri: String, reason: String },
    #[error("run {0:?} is already running")]
    AlreadyRunning(String),
    #[error("{uri} may not be read here: {reason}")]
    NotAllowed { uri: String, reason: String },
    #[error("{0} batch runs are running already (batch.max_concurrent_runs); try again when one is done")]
    TooManyRuns(usize),
}

/// Which inputs a run may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputPolicy {
    /// The operator's own shell (`txnflow batch`): any uri.
    Any,
    /// `POST /batches`: s3:// uris in these buckets, and local paths that
    /// resolve (`..` and symlinks) to a place under one of these roots.
    Restricted { buckets: Vec<String>, local_roots: Vec<PathBuf> },
}

impl InputPolicy {
    /// The policy of `POST /batches`, from `batch.allowed_buckets` and `batch.local_roots`.
    pub fn for_http(config: &crate::config::Config) -> InputPolicy {
        InputPolicy::Restricted {
            buckets: config.batch.buckets_allowed(&config.s3).into_iter().map(str::to_string).collect(),
            local_roots: config.batch.local_roots.iter().map(PathBuf::from).collect(),
        }
    }

    /// The uri as it may be read: a local path comes back resolved, so
    /// that what is opened is what was checked.
    pub fn check(&self, uri: &str) -> Result<BatchUri, BatchError> {
        let parsed = parse_uri(uri)?;
        let InputPolicy::Restricted { buckets, local_roots } = self else { return Ok(parsed) };
        let refuse = |reason: String| BatchError::NotAllowed { uri: uri.to_string(), reason };
        match parsed {
            BatchUri::S3Object { ref bucket, .. } | BatchUri::S3Prefix { ref bucket, .. } => {
                if buckets.iter().any(|allowed| allowed == bucket) {
                    Ok(parsed)
                } else {
                    Err(refuse(format!("bucket {bucket:?} is not in batch.allowed_buckets")))
                }
            }
            BatchUri::Local(_) if local_roots.is_empty() => {
                Err(refuse("local paths are not accepted here (batch.local_roots is empty); use s3://".into()))
            }
            BatchUri::Local(path) if !path.is_absolute() => Err(refuse("a local path must be absolute".into())),
            BatchUri::Local(path) => {
                let roots = resolved_roots(local_roots);
                match std::fs::canonicalize(&path) {
                    Ok(real) if under_any(&real, &roots) => Ok(BatchUri::Local(real)),
                    Ok(_) => Err(refuse("it is not under batch.local_roots".into())),
                    // Missing: say so only inside a root, so that the answer
                    // tells nothing about what exists elsewhere.
                    Err(_) if under_any(&lexically_normal(&path), &roots) => {
                        Err(BatchError::NotFound { uri: uri.to_string() })
                    }
                    Err(_) => Err(refuse("it is not under batch.local_roots".into())),
                }
            }
        }
    }

    /// Whether a file found by listing an allowed directory may be read:
    /// a symlink in a root may point out of it.
    fn allows_file(&self, path: &Path) -> bool {
        match self {
            InputPolicy::Any => true,
            InputPolicy::Restricted { local_roots, .. } => {
                std::fs::canonicalize(path).is_ok_and(|real| under_any(&real, &resolved_roots(local_roots)))
            }
        }
    }
}

fn resolved_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots.iter().filter_map(|root| std::fs::canonicalize(root).ok()).collect()
}

fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|root| path.starts_with(root))
}

/// `..` and `.` removed without touching the file system.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

/// Where one file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    S3 { bucket: String, key: String },
    Local(PathBuf),
}

impl Location {
    pub fn uri(&self) -> String {
        match self {
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
            Location::Local(path) => path.display().to_string(),
        }
    }
}

/// What a batch uri names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchUri {
    /// `s3://bucket/key.csv`
    S3Object { bucket: String, key: String },
    /// `s3://bucket/prefix/` or `s3://bucket`: every `.csv` under it.
    S3Prefix { bucket: String, prefix: String },
    /// A local file, or a directory: every `.csv` in it.
    Local(PathBuf),
}

/// Parses a batch uri. `file://` and plain paths are local.
pub fn parse_uri(uri: &str) -> Result<BatchUri, BatchError> {
    let bad = |reason: &str| BatchError::BadUri { uri: uri.to_string(), reason: reason.to_string() };
    if uri.trim().is_empty() {
        return Err(bad("empty"));
    }
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name after s3://"));
        }
        if !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.') {
            return Err(bad("a bucket name has lowercase letters, digits, '-' and '.' only"));
        }
        return Ok(if key.is_empty() || key.ends_with('/') {
            BatchUri::S3Prefix { bucket: bucket.to_string(), prefix: key.to_string() }
        } else {
            BatchUri::S3Object { bucket: bucket.to_string(), key: key.to_string() }
        });
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(BatchUri::Local(PathBuf::from(path)));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(bad(&format!("unsupported scheme {scheme:?}; use s3://bucket/key, s3://bucket/prefix/ or a path")));
    }
    Ok(BatchUri::Local(PathBuf::from(uri)))
}

/// Checks a run id: it names the error file, so it must be a file name.
pub fn check_run_id(run_id: &str) -> Result<(), BatchError> {
    let fine = !run_id.is_empty()
        && run_id.len() <= 200
        && run_id != "."
        && run_id != ".."
        && !run_id.chars().any(|c| c == '/' || c == '\\' || c.is_whitespace() || c.is_control());
    if fine { Ok(()) } else { Err(BatchError::BadRunId(run_id.to_string())) }
}

/// A fresh run id: `batch-<UTC time>-<6 hex>`.
pub fn new_run_id() -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("batch-{}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), &suffix[..6])
}

/// One checked input file of a run.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub location: Location,
    pub uri: String,
    pub delimiter: u8,
    pub layout: CsvLayout,
}

impl InputFile {
    /// One row's transaction, or why it is invalid.
    pub fn parse_row(&self, record: &csv_async::ByteRecord) -> Result<Transaction, String> {
        let mut fields = Vec::with_capacity(record.len());
        for (index, field) in record.iter().enumerate() {
            match std::str::from_utf8(field) {
                Ok(text) => fields.push(text),
                Err(_) => {
                    let name = self.layout.headers.get(index).map_or("?", String::as_str);
                    return Err(format!("{name}: not UTF-8 text"));
                }
            }
        }
        let raw = self.layout.raw_transaction(&fields).map_err(|e| e.to_string())?;
        validate(&raw).map_err(|e| e.to_string())
    }

    /// A streaming CSV reader whose rows are bounded by `bound`:
    /// `with_header` at the start of the file, without when it starts
    /// again at a line after a row over the bound.
    pub fn bounded_csv_reader(
        &self,
        body: ByteReader,
        bound: Arc<RecordBound>,
        with_header: bool,
    ) -> csv_async::AsyncReader<BoundedReader> {
        csv_async::AsyncReaderBuilder::new()
            .delimiter(self.delimiter)
            .has_headers(with_header)
            .flexible(true)
            .buffer_capacity(CSV_BUFFER)
            .create_reader(BoundedReader { inner: body, bound })
    }
}

/// Everything a run needs, checked before any row moves.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub run_id: String,
    pub uri: String,
    pub files: Vec<InputFile>,
    /// One error file per run; per input file when the input is a prefix.
    pub errors_per_file: bool,
}

impl RunSpec {
    /// Where the invalid rows of `file` go: `errors/<run_id>.csv` in the
    /// input's bucket (or beside a local input), or
    /// `errors/<run_id>/<file name>` for a prefix run.
    pub fn error_location(&self, file: &InputFile) -> Location {
        let name = |location: &Location| match location {
            Location::S3 { key, .. } => key.rsplit('/').next().unwrap_or(key).to_string(),
            Location::Local(path) => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let relative = if self.errors_per_file {
            format!("errors/{}/{}", self.run_id, name(&file.location))
        } else {
            format!("errors/{}.csv", self.run_id)
        };
        match &file.location {
            Location::S3 { bucket, .. } => Location::S3 { bucket: bucket.clone(), key: relative },
            Location::Local(path) => Location::Local(path.parent().unwrap_or(Path::new(".")).join(relative)),
        }
    }
}

/// Resolves the uri to its files, as `policy` allows, and checks each file's header.
pub async fn prepare(
    s3: &aws_sdk_s3::Client,
    uri: &str,
    run_id: &str,
    policy: &InputPolicy,
) -> Result<RunSpec, BatchError> {
    check_run_id(run_id)?;
    let (locations, errors_per_file) = match policy.check(uri)? {
        BatchUri::S3Object { bucket, key } => {
            check_bucket(s3, &bucket, uri).await?;
            (vec![Location::S3 { bucket, key }], false)
        }
        BatchUri::S3Prefix { bucket, prefix } => {
            check_bucket(s3, &bucket, uri).await?;
            (list_s3_csv(s3, &bucket, &prefix, uri).await?, true)
        }
        BatchUri::Local(path) if path.is_dir() => (list_local_csv(&path, uri, policy)?, true),
        BatchUri::Local(path) if path.exists() => (vec![Location::Local(path)], false),
        BatchUri::Local(_) => return Err(BatchError::NotFound { uri: uri.to_string() }),
    };
    let mut files = Vec::with_capacity(locations.len());
    for location in locations {
        let file_uri = location.uri();
        let mut reader = open(s3, &location).await?;
        let head = reader.fill_buf().await.map_err(|e| unreadable(&file_uri, e))?;
        let (delimiter, layout) = check_header(head, &file_uri)?;
        files.push(InputFile { location, uri: file_uri, delimiter, layout });
    }
    Ok(RunSpec { run_id: run_id.to_string(), uri: uri.to_string(), files, errors_per_file })
}

fn unreadable(uri: &str, error: impl std::fmt::Display) -> BatchError {
    BatchError::Unreadable { uri: uri.to_string(), reason: error.to_string() }
}

/// The header from the first bytes of a file: its delimiter and layout.
pub fn check_header(head: &[u8], uri: &str) -> Result<(u8, CsvLayout), BatchError> {
    let not_csv = |reason: &str| BatchError::NotCsv { uri: uri.to_string(), reason: reason.to_string() };
    if head.is_empty() {
        return Err(not_csv("the file is empty; a header line is required"));
    }
    // Text never holds NUL bytes; images, archives and the like do, early.
    if head[..head.len().min(8192)].contains(&0) {
        return Err(not_csv("it holds binary data"));
    }
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(not_csv("the first line is blank; a header line is required"));
    }
    let text = std::str::from_utf8(line).map_err(|_| not_csv("the header is not UTF-8 text"))?;
    let delimiter = detect_delimiter(line);
    let mut reader = csv::ReaderBuilder::new().has_headers(false).delimiter(delimiter).from_reader(text.as_bytes());
    let header = match reader.records().next() {
        Some(Ok(record)) => record,
        _ => return Err(not_csv("the header line cannot be read as CSV")),
    };
    let layout = CsvLayout::from_header(header.iter().map(|name| name.trim_end_matches('\r')))
        .map_err(|error| BatchError::Header { uri: uri.to_string(), error })?;
    Ok((delimiter, layout))
}

async fn check_bucket(s3: &aws_sdk_s3::Client, bucket: &str, uri: &str) -> Result<(), BatchError> {
    match s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(error) => {
            let service = error.into_service_error();
            if service.is_not_found() {
                Err(BatchError::NoSuchBucket { bucket: bucket.to_string(), uri: uri.to_string() })
            } else {
                Err(unreadable(uri, format!("{service} ({})", service.code().unwrap_or("no code"))))
            }
        }
    }
}

/// Every `.csv` key under the prefix, in key order; `errors/` is skipped,
/// since it holds the error files of earlier runs.
async fn list_s3_csv(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    uri: &str,
) -> Result<Vec<Location>, BatchError> {
    let mut keys = Vec::new();
    let mut pages = s3.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| unreadable(uri, e.into_service_error()))?;
        for object in page.contents() {
            if let Some(key) = object.key()
                && key.to_ascii_lowercase().ends_with(".csv")
                && !key[prefix.len()..].starts_with("errors/")
            {
                keys.push(key.to_string());
            }
        }
    }
    if keys.is_empty() {
        return Err(BatchError::NoCsvFiles { uri: uri.to_string() });
    }
    keys.sort();
    Ok(keys.into_iter().map(|key| Location::S3 { bucket: bucket.to_string(), key }).collect())
}

fn list_local_csv(dir: &Path, uri: &str, policy: &InputPolicy) -> Result<Vec<Location>, BatchError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| unreadable(uri, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("csv")))
        .filter(|path| policy.allows_file(path))
        .collect();
    if paths.is_empty() {
        return Err(BatchError::NoCsvFiles { uri: uri.to_string() });
    }
    paths.sort();
    Ok(paths.into_iter().map(Location::Local).collect())
}

/// A buffered stream of the file's bytes, from the start.
pub type ByteReader = Box<dyn AsyncBufRead + Unpin + Send>;

/// The CSV parser's own buffer: how far it may read past a row's end.
const CSV_BUFFER: usize = 8 * 1024;

/// The bound on one CSV row (`batch.max_record_bytes`), shared by the
/// reading loop, which marks where each row starts, and the
/// [`BoundedReader`] under the parser, which refuses to hand it more bytes
/// once a row has grown past the bound (an unbalanced quote makes the rest
/// of the file one row; without this, the parser would hold all of it).
#[derive(Debug)]
pub struct RecordBound {
    limit: u64,
    row_start: std::sync::atomic::AtomicU64,
    delivered: std::sync::atomic::AtomicU64,
    exceeded: std::sync::atomic::AtomicBool,
}

impl RecordBound {
    pub fn new(limit: usize) -> Arc<RecordBound> {
        Arc::new(RecordBound {
            limit: limit as u64,
            row_start: Default::default(),
            delivered: Default::default(),
            exceeded: Default::default(),
        })
    }

    /// The next row starts at this byte of the reader's stream.
    pub fn row_starts_at(&self, byte: u64) {
        self.row_start.store(byte, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the reader stopped because a row grew past the bound.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A file's bytes, handed to the CSV parser only while the row being
/// parsed is within its [`RecordBound`] (plus the parser's buffer).
pub struct BoundedReader {
    inner: ByteReader,
    bound: Arc<RecordBound>,
}

impl tokio::io::AsyncRead for BoundedReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::sync::atomic::Ordering::Relaxed;
        let this = self.get_mut();
        let bound = &this.bound;
        let in_row = bound.delivered.load(Relaxed).saturating_sub(bound.row_start.load(Relaxed));
        if in_row > bound.limit + CSV_BUFFER as u64 {
            bound.exceeded.store(true, Relaxed);
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a row longer than batch.max_record_bytes",
            )));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            bound.delivered.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        }
        polled
    }
}

/// One row as [`RowReader`] hands it out.
pub enum Row<'r> {
    /// A row within the bound, and the line it starts on.
    Record { line: u64, record: &'r csv_async::ByteRecord },
    /// A row over `batch.max_record_bytes`, starting on this line; its bytes
    /// were not kept, and reading goes on at the next line.
    Oversized { line: u64 },
}

/// The rows of one input file, each bounded by `batch.max_record_bytes`.
/// A row that grows past the bound is handed out as [`Row::Oversized`],
/// and reading starts again at the next line (a new request from there),
/// so an unbalanced quote or a huge line costs one row and bounded memory.
pub struct RowReader<'a> {
    s3: &'a aws_sdk_s3::Client,
    file: &'a InputFile,
    max_bytes: usize,
    /// Where the current reader started: a byte offset, and the lines before it.
    segment: (u64, u64),
    reader: Option<(csv_async::AsyncReader<BoundedReader>, Arc<RecordBound>)>,
    record: csv_async::ByteRecord,
    /// Set once the file is read to its end: one past its last line.
    end_line: Option<u64>,
}

impl<'a> RowReader<'a> {
    pub fn new(s3: &'a aws_sdk_s3::Client, file: &'a InputFile, max_bytes: usize) -> RowReader<'a> {
        RowReader {
            s3,
            file,
            max_bytes,
            segment: (0, 0),
            reader: None,
            record: csv_async::ByteRecord::new(),
            end_line: None,
        }
    }

    /// One past the file's last line, once [`RowReader::next`] gave None.
    pub fn end_line(&self) -> u64 {
        self.end_line.unwrap_or(0)
    }

    /// The next row, or None at the end of the file.
    pub async fn next(&mut self) -> Result<Option<Row<'_>>, BatchError> {
        let uri = self.file.uri.as_str();
        if self.end_line.is_some() {
            return Ok(None);
        }
        if self.reader.is_none() {
            let (byte, _) = self.segment;
            let body = open_at(self.s3, &self.file.location, byte).await?;
            let bound = RecordBound::new(self.max_bytes);
            let mut reader = self.file.bounded_csv_reader(body, bound.clone(), byte == 0);
            if byte == 0 {
                // Checked before the run; read past it, so that the first
                // row's start is marked where the row starts.
                reader.byte_headers().await.map_err(|e| unreadable(uri, e))?;
            }
            self.reader = Some((reader, bound));
        }
        let (reader, bound) = self.reader.as_mut().expect("opened above");
        let (segment_byte, segment_line) = self.segment;
        let start = reader.position().clone();
        bound.row_starts_at(start.byte());
        match reader.read_byte_record(&mut self.record).await {
            Ok(false) => {
                self.end_line = Some(segment_line + reader.position().line());
                Ok(None)
            }
            Ok(true) => {
                let line = segment_line + self.record.position().map_or(0, |p| p.line());
                if reader.position().byte() - start.byte() > self.max_bytes as u64 {
                    return Ok(Some(Row::Oversized { line }));
                }
                Ok(Some(Row::Record { line, record: &self.record }))
            }
            Err(_) if bound.exceeded() => {
                let line = segment_line + start.line();
                self.reader = None;
                match next_line_start(self.s3, &self.file.location, segment_byte + start.byte()).await? {
                    Some(next) => self.segment = (next, line),
                    None => self.end_line = Some(line + 1),
                }
                Ok(Some(Row::Oversized { line }))
            }
            Err(error) => Err(unreadable(uri, error)),
        }
    }
}

/// The reason an oversized row gives, in the error file.
pub fn oversized_reason(max_bytes: usize) -> String {
    format!(
        "a row longer than batch.max_record_bytes ({max_bytes} bytes; an unbalanced quote?): \
         reading went on at the next line"
    )
}

/// Where the line after the one starting at byte `from` starts, reading
/// from there without keeping what it reads; None when the file ends first.
pub async fn next_line_start(
    s3: &aws_sdk_s3::Client,
    location: &Location,
    from: u64,
) -> Result<Option<u64>, BatchError> {
    let mut reader = open_at(s3, location, from).await?;
    let mut offset = from;
    loop {
        let chunk = reader.fill_buf().await.map_err(|e| unreadable(&location.uri(), e))?;
        if chunk.is_empty() {
            return Ok(None);
        }
        if let Some(at) = chunk.iter().position(|&b| b == b'\n') {
            return Ok(Some(offset + at as u64 + 1));
        }
        let length = chunk.len();
        offset += length as u64;
        reader.consume(length);
    }
}

/// Opens a file as a stream from byte `offset` (an S3 range request, or a seek).
pub async fn open_at(s3: &aws_sdk_s3::Client, location: &Location, offset: u64) -> Result<ByteReader, BatchError> {
    if offset == 0 {
        return open(s3, location).await;
    }
    const BUFFER: usize = 256 * 1024;
    let uri = location.uri();
    match location {
        Location::S3 { bucket, key } => {
            match s3.get_object().bucket(bucket).key(key).range(format!("bytes={offset}-")).send().await {
                Ok(object) => Ok(Box::new(BufReader::with_capacity(BUFFER, object.body.into_async_read()))),
                Err(error) => {
                    let service = error.into_service_error();
                    // At the very end of the object: nothing left to read.
                    if service.code() == Some("InvalidRange") {
                        Ok(Box::new(BufReader::new(tokio::io::empty())))
                    } else {
                        Err(unreadable(&uri, format!("{service} ({})", service.code().unwrap_or("no code"))))
                    }
                }
            }
        }
        Location::Local(path) => {
            use tokio::io::AsyncSeekExt;
            let mut file = tokio::fs::File::open(path).await.map_err(|e| unreadable(&uri, e))?;
            file.seek(std::io::SeekFrom::Start(offset)).await.map_err(|e| unreadable(&uri, e))?;
            Ok(Box::new(BufReader::with_capacity(BUFFER, file)))
        }
    }
}

/// Opens a file as a stream: an S3 body is read as it arrives, never whole.
pub async fn open(s3: &aws_sdk_s3::Client, location: &Location) -> Result<ByteReader, BatchError> {
    const BUFFER: usize = 256 * 1024;
    let uri = location.uri();
    match location {
        Location::S3 { bucket, key } => match s3.get_object().bucket(bucket).key(key).send().await {
            Ok(object) => Ok(Box::new(BufReader::with_capacity(BUFFER, object.body.into_async_read()))),
            Err(error) => {
                let service = error.into_service_error();
                if service.is_no_such_key() {
                    Err(BatchError::NotFound { uri })
                } else if service.code() == Some("NoSuchBucket") {
                    Err(BatchError::NoSuchBucket { bucket: bucket.clone(), uri })
                } else {
                    Err(unreadable(&uri, format!("{service} ({})", service.code().unwrap_or("no code"))))
                }
            }
        },
        Location::Local(path) => match tokio::fs::File::open(path).await {
            Ok(file) => Ok(Box::new(BufReader::with_capacity(BUFFER, file))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(BatchError::NotFound { uri }),
            Err(error) => Err(unreadable(&uri, error)),
        },
    }
}

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

/// What `GET /batches/<run_id>` answers for a run this process does not
/// run, from its `batch_runs` row: the report its instance last recorded,
/// `age_ms` old. A running run whose instance stopped reporting for longer
/// than `stale_after_ms` is `interrupted`: POSTing it again resumes it.
pub fn recorded_answer(report: &str, instance: &str, age_ms: i64, stale_after_ms: u64) -> serde_json::Value {
    let mut answer: serde_json::Value = serde_json::from_str(report).unwrap_or_else(|_| serde_json::json!({}));
    if answer["status"] == "running" && age_ms > stale_after_ms as i64 {
        answer["status"] = "interrupted".into();
        answer["error"] = format!(
            "{instance}, which runs it, stopped reporting {:.0} s ago; POST the run again to resume it",
            age_ms as f64 / 1000.0
        )
        .into();
    }
    answer["instance"] = instance.into();
    answer
}

/// How a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
}

/// What `GET /batches/<run_id>` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub uri: String,
    pub status: RunStatus,
    pub files: usize,
    pub files_done: usize,
    #[serde(flatten)]
    pub counts: RunCounts,
    pub error_files: Vec<String>,
    pub error: Option<String>,
    pub elapsed_seconds: f64,
    pub summary: String,
}

struct RunState {
    spec: Arc<RunSpec>,
    status: RunStatus,
    files_done: usize,
    /// Counts of the finished files.
    done: RunCounts,
    /// The file being read, and its progress.
    current: Option<(String, FileProgress)>,
    error_files: Vec<String>,
    error: Option<String>,
    started: Instant,
    elapsed: Option<f64>,
    /// The finished report is in the `batch_runs` table.
    final_recorded: bool,
    /// Another process took the run over in `batch_runs` (said once).
    taken_over: bool,
}

impl RunState {
    fn counts(&self) -> RunCounts {
        let mut counts = self.done;
        if let Some((_, progress)) = &self.current {
            counts.add(&progress.counts);
        }
        counts
    }
}

/// Finished runs kept in memory, newest first, once the table has them;
/// older ones are answered from `batch_runs`.
const FINISHED_KEPT: usize = 16;

/// Drops the finished runs, already recorded, beyond the newest [`FINISHED_KEPT`].
fn forget_finished(runs: &mut HashMap<String, RunState>) {
    let mut finished: Vec<(f64, String)> = runs
        .iter()
        .filter(|(_, run)| run.status != RunStatus::Running && run.final_recorded)
        .map(|(id, run)| (run.started.elapsed().as_secs_f64() - run.elapsed.unwrap_or(0.0), id.clone()))
        .collect();
    if finished.len() <= FINISHED_KEPT {
        return;
    }
    // Since each finished, smallest first: the newest.
    finished.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (_, id) in finished.into_iter().skip(FINISHED_KEPT) {
        runs.remove(&id);
    }
}

/// Every batch run of this process, and the progress of each.
#[derive(Default)]
pub struct BatchRuns {
    runs: Mutex<HashMap<String, RunState>>,
    changed: tokio::sync::Notify,
}

impl BatchRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunState>> {
        self.runs.lock().expect("batch runs lock")
    }

    /// Registers a run; a run id that is still running is refused, and so
    /// is a run beyond `max_running`.
    pub fn begin(&self, spec: RunSpec, max_running: usize) -> Result<Arc<RunSpec>, BatchError> {
        let mut runs = self.lock();
        if runs.get(&spec.run_id).is_some_and(|run| run.status == RunStatus::Running) {
            return Err(BatchError::AlreadyRunning(spec.run_id));
        }
        if runs.values().filter(|run| run.status == RunStatus::Running).count() >= max_running {
            return Err(BatchError::TooManyRuns(max_running));
        }
        let spec = Arc::new(spec);
        runs.insert(
            spec.run_id.clone(),
            RunState {
                spec: spec.clone(),
                status: RunStatus::Running,
                files_done: 0,
                done: RunCounts::default(),
                current: None,
                error_files: Vec::new(),
                error: None,
                started: Instant::now(),
                elapsed: None,
                final_recorded: false,
                taken_over: false,
            },
        );
        Ok(spec)
    }

    /// Runs still running, to resume after the loader restarted.
    pub fn running(&self) -> Vec<Arc<RunSpec>> {
        self.lock().values().filter(|run| run.status == RunStatus::Running).map(|run| run.spec.clone()).collect()
    }

    /// How many files of the run are done: where a resumed run goes on.
    pub fn files_done(&self, run_id: &str) -> usize {
        self.lock().get(run_id).map_or(0, |run| run.files_done)
    }

    /// Makes `uri` the run's current file, keeping its progress if it is already.
    pub fn start_file(&self, run_id: &str, uri: &str) {
        if let Some(run) = self.lock().get_mut(run_id)
            && run.current.as_ref().is_none_or(|(current, _)| current != uri)
        {
            run.current = Some((uri.to_string(), FileProgress::default()));
        }
    }

    fn with_file<T>(&self, run_id: &str, uri: &str, change: impl FnOnce(&mut FileProgress) -> T) -> Option<T> {
        let mut runs = self.lock();
        let (current, progress) = runs.get_mut(run_id)?.current.as_mut()?;
        (current == uri).then(|| change(progress))
    }

    /// A row starting at `line` was read: what the loader does with it, and
    /// the row `parse`d, unless it is settled already (a re-read skips it
    /// unparsed). One lock per row.
    pub fn row<T>(
        &self,
        run_id: &str,
        uri: &str,
        line: u64,
        parse: impl FnOnce() -> Result<T, String>,
    ) -> (RowAction, Option<Result<T, String>>) {
        self.with_file(run_id, uri, |progress| {
            if progress.is_settled(line) {
                return (RowAction::Skip, None);
            }
            let parsed = parse();
            let kind = if parsed.is_ok() { RowKind::Valid } else { RowKind::Invalid };
            (progress.row(line, kind), Some(parsed))
        })
        .unwrap_or((RowAction::Skip, None))
    }

    pub fn resume_line(&self, run_id: &str, uri: &str) -> u64 {
        self.with_file(run_id, uri, |progress| progress.resume_line()).unwrap_or(0)
    }

    pub fn end_of_file(&self, run_id: &str, uri: &str, last_line: u64) {
        self.with_file(run_id, uri, |progress| progress.end_of_file(last_line));
        self.changed.notify_waiters();
    }

    /// Rows of a run settled (from the DbWriter or the DlqPublisher).
    pub fn settle(&self, run_id: &str, uri: &str, lines: impl IntoIterator<Item = (u64, RowOutcome)>) {
        self.with_file(run_id, uri, |progress| {
            for (line, outcome) in lines {
                progress.settle(line, outcome);
            }
        });
        self.changed.notify_waiters();
    }

    pub fn is_file_done(&self, run_id: &str, uri: &str) -> bool {
        self.with_file(run_id, uri, |progress| progress.is_done()).unwrap_or(true)
    }

    /// Waits for a change of any run's progress, or `timeout`.
    pub async fn changed(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    /// The current file is done: its counts join the run's.
    pub fn file_done(&self, run_id: &str, error_file: Option<String>) {
        if let Some(run) = self.lock().get_mut(run_id) {
            if let Some((_, progress)) = run.current.take() {
                run.done.add(&progress.counts);
            }
            run.files_done += 1;
            run.error_files.extend(error_file);
        }
    }

    pub fn finish(&self, run_id: &str, error: Option<String>) {
        if let Some(run) = self.lock().get_mut(run_id) {
            run.status = if error.is_some() { RunStatus::Failed } else { RunStatus::Completed };
            run.error = error;
            run.elapsed = Some(run.started.elapsed().as_secs_f64());
        }
        self.changed.notify_waiters();
    }

    /// Whether this process is running `run_id`.
    pub fn is_running(&self, run_id: &str) -> bool {
        self.lock().get(run_id).is_some_and(|run| run.status == RunStatus::Running)
    }

    /// The reports the `batch_runs` table does not have yet: every running
    /// run's progress, and each finished run's final report until it is
    /// recorded ([`BatchRuns::recorded`]).
    pub fn to_record(&self) -> Vec<RunReport> {
        let ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, run)| run.status == RunStatus::Running || !run.final_recorded)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.report(id)).collect()
    }

    /// `report` was sent to the table: `mine` when it is in, false when
    /// another process has taken the run over. A finished one is not sent
    /// again either way. Returns true the first time the run is found taken
    /// over, so that it is said once, not at every heartbeat.
    pub fn recorded(&self, report: &RunReport, mine: bool) -> bool {
        let mut runs = self.lock();
        let Some(run) = runs.get_mut(&report.run_id) else { return false };
        if report.status != RunStatus::Running && run.status == report.status {
            run.final_recorded = true;
        }
        let first_refusal = !mine && !run.taken_over;
        run.taken_over |= !mine;
        forget_finished(&mut runs);
        first_refusal
    }

    /// A run's report before it starts: nothing counted yet.
    pub fn starting_report(spec: &RunSpec) -> RunReport {
        let counts = RunCounts::default();
        RunReport {
            run_id: spec.run_id.clone(),
            uri: spec.uri.clone(),
            status: RunStatus::Running,
            files: spec.files.len(),
            files_done: 0,
            counts,
            error_files: Vec::new(),
            error: None,
            elapsed_seconds: 0.0,
            summary: counts.summary(0.0),
        }
    }

    pub fn report(&self, run_id: &str) -> Option<RunReport> {
        let runs = self.lock();
        let run = runs.get(run_id)?;
        let counts = run.counts();
        let elapsed = run.elapsed.unwrap_or_else(|| run.started.elapsed().as_secs_f64());
        Some(RunReport {
            run_id: run_id.to_string(),
            uri: run.spec.uri.clone(),
            status: run.status,
            files: run.spec.files.len(),
            files_done: run.files_done,
            counts,
            error_files: run.error_files.clone(),
            error: run.error.clone(),
            elapsed_seconds: elapsed,
            summary: counts.summary(elapsed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_an_object_a_prefix_or_a_path() {
        assert_eq!(
            parse_uri("s3://transactions/2026/01.csv"),
            Ok(BatchUri::S3Object { bucket: "transactions".into(), key: "2026/01.csv".into() })
        );
        assert_eq!(
            parse_uri("s3://transactions/month=2026-01/"),
            Ok(BatchUri::S3Prefix { bucket: "transactions".into(), prefix: "month=2026-01/".into() })
        );
        assert_eq!(
            parse_uri("s3://transactions"),
            Ok(BatchUri::S3Prefix { bucket: "transactions".into(), prefix: "".into() })
        );
        assert_eq!(parse_uri("/data/in.csv"), Ok(BatchUri::Local("/data/in.csv".into())));
        assert_eq!(parse_uri("file:///data/in.csv"), Ok(BatchUri::Local("/data/in.csv".into())));
        for bad in ["", "s3://", "s3:///key.csv", "ftp://host/file.csv", "s3://Bad_Bucket/x.csv"] {
            assert!(matches!(parse_uri(bad), Err(BatchError::BadUri { .. })), "{bad:?}");
        }
    }

    #[test]
    fn over_http_only_allowed_buckets_and_paths_under_a_root_are_read() {
        let dir = std::env::temp_dir().join(format!("txnflow-policy-{}", uuid::Uuid::new_v4().simple()));
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("in.csv"), "x").unwrap();
        std::fs::write(dir.join("outside.csv"), "x").unwrap();
        std::os::unix::fs::symlink(dir.join("outside.csv"), root.join("link.csv")).unwrap();
        let policy = InputPolicy::Restricted { buckets: vec!["transactions".into()], local_roots: vec![root.clone()] };
        let allowed = |uri: &str| policy.check(uri);
        let refused = |uri: &str| matches!(policy.check(uri), Err(BatchError::NotAllowed { .. }));
        assert!(allowed("s3://transactions/m/a.csv").is_ok());
        assert!(refused("s3://other/a.csv"));
        let inside = root.join("in.csv").display().to_string();
        assert_eq!(allowed(&inside), Ok(BatchUri::Local(std::fs::canonicalize(&inside).unwrap())));
        assert!(allowed(&format!("file://{inside}")).is_ok());
        assert!(refused("/etc/passwd"));
        assert!(refused("file:///etc/passwd"));
        assert!(refused(&format!("{}/../outside.csv", root.display())));
        assert!(refused(&format!("{}/link.csv", root.display())), "a symlink out of the root");
        assert!(refused("relative/in.csv"));
        assert!(matches!(allowed(&format!("{}/missing.csv", root.display())), Err(BatchError::NotFound { .. })));
        assert!(refused(&format!("{}/../missing.csv", root.display())), "missing and outside: refused");
        let listed = list_local_csv(&root, "root", &policy).unwrap();
        assert_eq!(listed, [Location::Local(root.join("in.csv"))], "the symlink out is not listed");
        let closed = InputPolicy::Restricted { buckets: vec!["transactions".into()], local_roots: vec![] };
        assert!(matches!(closed.check(&inside), Err(BatchError::NotAllowed { .. })));
        assert!(InputPolicy::Any.check("/etc/passwd").is_ok(), "the CLI reads what its operator names");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_ids_are_file_names() {
        assert!(check_run_id("scheduled__2026-01-01T00:00:00+00:00").is_ok());
        assert!(check_run_id(&new_run_id()).is_ok());
        for bad in ["", "a/b", "two words", "..", &"x".repeat(201)] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn headers_are_checked_before_any_row() {
        let (delimiter, layout) = check_header(
            "\u{feff}id;description;amount;timestamp;merchant;operation_type;side\r\n1;x;1,5;2026-01-01 00:00:00;;a;debit\n"
                .as_bytes(),
            "f.csv",
        )
        .unwrap();
        assert_eq!(delimiter, b';');
        assert_eq!(layout.headers[0], "id");
        assert_eq!(layout.headers[6], "side");
        let error = check_header(b"id,description,amount\n", "f.csv").unwrap_err();
        assert_eq!(
            error.to_string(),
            "f.csv: the header lacks the required column(s) timestamp, merchant, operation_type, side"
        );
        // The file's own first line is never repeated (it may be a secret).
        let error = check_header(b"root:x:0:0:root:/root:/bin/bash\n", "/etc/passwd").unwrap_err();
        assert!(!error.to_string().contains("root:x"), "{error}");
        assert!(matches!(check_header(b"", "f.csv"), Err(BatchError::NotCsv { .. })));
        assert!(matches!(check_header(b"\x89PNG\r\n\x1a\n\0\0", "f.csv"), Err(BatchError::NotCsv { .. })));
        assert!(matches!(check_header(b"\xff\xfeid\n", "f.csv"), Err(BatchError::NotCsv { .. })));
    }

    #[test]
    fn error_files_go_beside_the_input() {
        let file = |location: Location| InputFile {
            uri: location.uri(),
            location,
            delimiter: b',',
            layout: CsvLayout::from_header(crate::domain::csv_rules::REQUIRED_COLUMNS).unwrap(),
        };
        let s3 = file(Location::S3 { bucket: "b".into(), key: "in/jan.csv".into() });
        let local = file(Location::Local("/data/in/jan.csv".into()));
        let single = RunSpec { run_id: "r1".into(), uri: "x".into(), files: vec![], errors_per_file: false };
        assert_eq!(single.error_location(&s3).uri(), "s3://b/errors/r1.csv");
        assert_eq!(single.error_location(&local).uri(), "/data/in/errors/r1.csv");
        let prefix = RunSpec { errors_per_file: true, ..single };
        assert_eq!(prefix.error_location(&s3).uri(), "s3://b/errors/r1/jan.csv");
    }

    #[test]
    fn a_recorded_run_is_interrupted_once_its_instance_is_silent_too_long() {
        let report = r#"{"run_id":"2026-01","status":"running","read":10,"error":null}"#;
        let fresh = recorded_answer(report, "host-a/1", 1_000, 30_000);
        assert_eq!(fresh["status"], "running");
        assert_eq!(fresh["error"], serde_json::Value::Null);
        assert_eq!(fresh["instance"], "host-a/1");
        assert_eq!(fresh["read"], 10);
        let silent = recorded_answer(report, "host-a/1", 45_000, 30_000);
        assert_eq!(silent["status"], "interrupted");
        assert_eq!(
            silent["error"],
            "host-a/1, which runs it, stopped reporting 45 s ago; POST the run again to resume it"
        );
        // A finished run stays as it was, however old.
        let done = recorded_answer(r#"{"status":"completed","error":null}"#, "host-a/1", 9_000_000, 30_000);
        assert_eq!(done["status"], "completed");
        assert_eq!(done["error"], serde_json::Value::Null);
    }

    #[test]
    fn runs_beyond_the_bound_are_refused_and_finished_ones_leave_memory() {
        let runs = BatchRuns::default();
        let spec =
            |id: &str| RunSpec { run_id: id.into(), uri: "s3://b/k.csv".into(), files: vec![], errors_per_file: false };
        runs.begin(spec("a"), 2).unwrap();
        runs.begin(spec("b"), 2).unwrap();
        assert_eq!(runs.begin(spec("c"), 2).unwrap_err(), BatchError::TooManyRuns(2));
        runs.finish("a", None);
        runs.begin(spec("c"), 2).unwrap();
        runs.finish("b", None);
        runs.finish("c", None);
        for i in 0..FINISHED_KEPT + 5 {
            let id = format!("r{i}");
            runs.begin(spec(&id), 2).unwrap();
            runs.finish(&id, None);
        }
        for report in runs.to_record() {
            runs.recorded(&report, true);
        }
        assert_eq!(runs.lock().len(), FINISHED_KEPT, "only the newest finished runs stay in memory");
        assert!(runs.report(&format!("r{}", FINISHED_KEPT + 4)).is_some(), "the newest is kept");
        assert!(runs.report("a").is_none(), "the oldest is answered from the table");
    }

    #[test]
    fn a_run_is_recorded_until_its_final_report_is_in_and_a_takeover_is_said_once() {
        let runs = BatchRuns::default();
        let spec =
            RunSpec { run_id: "2026-01".into(), uri: "s3://b/k.csv".into(), files: vec![], errors_per_file: false };
        runs.begin(spec, 4).unwrap();
        let running = runs.to_record();
        assert_eq!(running.len(), 1);
        assert!(!runs.recorded(&running[0], true), "recorded as ours");
        assert_eq!(runs.to_record().len(), 1, "a running run is recorded at every heartbeat");
        assert!(runs.recorded(&running[0], false), "first refusal: say it");
        assert!(!runs.recorded(&running[0], false), "then quiet");
        runs.finish("2026-01", None);
        let done = runs.to_record();
        assert_eq!(done[0].status, RunStatus::Completed);
        runs.recorded(&done[0], true);
        assert!(runs.to_record().is_empty(), "the final report is in");
    }
}
