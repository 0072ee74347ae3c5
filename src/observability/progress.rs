//! A long run's progress, said as it goes: on a terminal, one line redrawn
//! in place (indicatif); elsewhere (CI, a log file, the service's own
//! runs), a log line every 5 s. Both say the percent done, the rate and
//! the time left.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::progress::estimate;

/// The bar on screen, if any: the log writes its lines above it.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn shown() -> std::sync::MutexGuard<'static, Option<ProgressBar>> {
    SHOWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Standard error for the log: while a bar is drawn, a log line is
/// written above it, and the bar drawn again below.
#[derive(Default)]
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let bar = shown().clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(bytes)).map(|()| bytes.len()),
            None => std::io::stderr().write(bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// How often a line is said without a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// What a run counts its progress in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of input read (a batch run's files).
    Bytes,
    /// Rows, transactions or records.
    Rows,
}

pub struct Progress {
    what: String,
    unit: Unit,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    /// Done by an earlier attempt of a resumed run: not this attempt's rate.
    done_before: Option<u64>,
}

impl Progress {
    /// A bar on standard error when it is a terminal, else a line every 5 s.
    pub fn start(what: impl Into<String>, unit: Unit) -> Progress {
        let mut progress = Progress::lines(what, unit);
        if std::io::stderr().is_terminal() {
            let bar = bar(&progress.what, unit);
            *shown() = Some(bar.clone());
            progress.bar = Some(bar);
        }
        progress
    }

    /// A line every 5 s, terminal or not: for the service's own runs.
    pub fn lines(what: impl Into<String>, unit: Unit) -> Progress {
        let now = Instant::now();
        Progress { what: what.into(), unit, bar: None, started: now, last_line: now, done_before: None }
    }

    /// `done` of `total` (None while unknown); `detail` is the counts so far.
    pub fn show(&mut self, done: u64, total: Option<u64>, detail: &str) {
        let first = self.done_before.is_none();
        let before = *self.done_before.get_or_insert(done);
        // 100% once finished only: the last rows read may not be written yet.
        let done = total.map_or(done, |total| done.min(total.saturating_sub(1)));
        if let Some(bar) = &self.bar {
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(done);
            bar.set_message(detail.to_string());
            if first {
                // A resumed run starts past 0: its rate counts from here.
                bar.reset_eta();
            }
        } else if self.last_line.elapsed() >= LINE_EVERY {
            tracing::info!("{}", self.line(done.saturating_sub(before), done, total, detail));
            self.last_line = Instant::now();
        }
    }

    /// Draws the bar at its end (100% when `done` is the total) and leaves
    /// it on screen; without a terminal the caller's summary says the end.
    pub fn finish(&mut self, done: u64, total: Option<u64>, detail: &str) {
        if let Some(bar) = self.bar.take() {
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(done);
            bar.finish_with_message(detail.to_string());
            *shown() = None;
            // The bar stays; what is said next goes below it.
            if !bar.is_hidden() {
                eprintln!();
            }
        }
    }

    /// "what: 42.5%, about 1 min 20 s left, 3,200 rows/s: detail".
    fn line(&self, done_now: u64, done: u64, total: Option<u64>, detail: &str) -> String {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = (done_now as f64 / seconds.max(0.001)).round();
        let rate = match self.unit {
            Unit::Bytes => format!("{}/s", indicatif::BinaryBytes(rate as u64)),
            Unit::Rows => format!("{} rows/s", indicatif::HumanCount(rate as u64)),
        };
        match total {
            Some(total) => {
                let estimate = estimate(done, total, done_now, seconds);
                format!("{}: {}, {rate}: {detail}", self.what, estimate.describe())
            }
            None => format!("{}: {rate}: {detail}", self.what),
        }
    }

    /// Leaves the bar where it stopped (a run that ends early), so that
    /// what is said next goes below it.
    pub fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
            *shown() = None;
            if !bar.is_hidden() {
                eprintln!();
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.abandon();
    }
}

fn bar(what: &str, unit: Unit) -> ProgressBar {
    let template = match unit {
        Unit::Bytes => {
            "{prefix} [{bar:24}] {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta_precise} left {wide_msg}"
        }
        Unit::Rows => {
            "{prefix} [{bar:24}] {percent:>3}% {human_pos}/{human_len} {per_sec} {eta_precise} left {wide_msg}"
        }
    };
    let style = ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(style);
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_the_percent_the_time_left_and_the_rate() {
        let mut progress = Progress::lines("batch run r1", Unit::Rows);
        progress.started = Instant::now() - Duration::from_secs(10);
        let line = progress.line(5_000, 5_000, Some(20_000), "read 5000 written 5000");
        assert_eq!(line, "batch run r1: 25.0%, about 30 s left, 500 rows/s: read 5000 written 5000");
        let unknown = progress.line(5_000, 5_000, None, "read 5000");
        assert_eq!(unknown, "batch run r1: 500 rows/s: read 5000");
    }

    #[test]
    fn bytes_are_said_in_binary_units() {
        let mut progress = Progress::lines("batch run r2", Unit::Bytes);
        progress.started = Instant::now() - Duration::from_secs(4);
        let line = progress.line(8 << 20, 8 << 20, Some(16 << 20), "read 1000");
        assert_eq!(line, "batch run r2: 50.0%, about 4 s left, 2.00 MiB/s: read 1000");
    }
}
