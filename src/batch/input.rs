//! Where a run's files are: the uri resolved to its input files, as the
//! input policy allows, each file's header checked before any row moves.

use std::path::{Path, PathBuf};

use aws_sdk_s3::error::ProvideErrorMetadata;
use tokio::io::AsyncBufReadExt;

use crate::domain::csv_rules::{CsvLayout, HeaderError, detect_delimiter};
use crate::domain::transaction::Transaction;
use crate::domain::validation::validate;

use super::rows::open;

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
    /// Its size in bytes when known, for the run's percent and time left.
    pub size: Option<u64>,
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

    /// Where the run's invalid rows will go, said before it starts: the
    /// error file, or for a prefix the folder of one file per input.
    pub fn errors_destination(&self) -> String {
        let Some(first) = self.files.first() else { return String::new() };
        let location = self.error_location(first).uri();
        match location.rsplit_once('/') {
            Some((folder, _)) if self.errors_per_file => format!("{folder}/<file name>"),
            _ => location,
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
        let size = super::rows::size_of(s3, &location).await;
        files.push(InputFile { location, uri: file_uri, delimiter, layout, size });
    }
    Ok(RunSpec { run_id: run_id.to_string(), uri: uri.to_string(), files, errors_per_file })
}

pub(super) fn unreadable(uri: &str, error: impl std::fmt::Display) -> BatchError {
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
            size: None,
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
        // Said before the run starts.
        let single = RunSpec { files: vec![local], errors_per_file: false, ..prefix };
        assert_eq!(single.errors_destination(), "/data/in/errors/r1.csv");
        let prefix = RunSpec { files: vec![s3], errors_per_file: true, ..single };
        assert_eq!(prefix.errors_destination(), "s3://b/errors/r1/<file name>");
    }
}
