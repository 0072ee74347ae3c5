//! A file's rows, read as a stream (an S3 body as it arrives, never
//! whole), each bounded by `batch.max_record_bytes`.

use std::sync::Arc;

use aws_sdk_s3::error::ProvideErrorMetadata;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::input::{BatchError, InputFile, Location, unreadable};

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

    /// How far into the file reading is, in bytes: the end of the last row read.
    pub fn bytes_read(&self) -> u64 {
        let (segment_byte, _) = self.segment;
        segment_byte + self.reader.as_ref().map_or(0, |(reader, _)| reader.position().byte())
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

/// A file's size in bytes, when the store says it (an S3 HEAD, a local
/// file's metadata); None leaves the run without a percent.
pub async fn size_of(s3: &aws_sdk_s3::Client, location: &Location) -> Option<u64> {
    match location {
        Location::S3 { bucket, key } => {
            let head = s3.head_object().bucket(bucket).key(key).send().await.ok()?;
            head.content_length().and_then(|length| u64::try_from(length).ok())
        }
        Location::Local(path) => tokio::fs::metadata(path).await.ok().map(|metadata| metadata.len()),
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

impl InputFile {
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
