//! The registry of runs: every batch run of this process and its
//! progress, as `GET /batches/<run_id>` reports it, and the answer for a
//! run recorded by another instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::domain::run_progress::{FileProgress, RowAction, RowKind, RowOutcome, RunCounts};

use super::input::{BatchError, RunSpec};

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
    /// Bytes of the run's files read so far, out of their total when every
    /// file's size is known.
    pub bytes_read: u64,
    pub bytes_total: Option<u64>,
    /// Done by bytes read, rounded down to a tenth and below 100 until the
    /// run completes; None when a file's size is unknown.
    pub percent: Option<f64>,
    /// Seconds left at the rate so far; None when unknown.
    pub eta_seconds: Option<f64>,
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
    /// Rows lost in flight so far: the loader reads its file again when this moves.
    losses: u64,
    /// Another process took the run over in `batch_runs` (said once).
    taken_over: bool,
    /// Bytes of the finished files, and of the current one read so far.
    bytes_done: u64,
    current_bytes: u64,
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

/// The run's bytes, when every file's size is known.
fn total_bytes(spec: &RunSpec) -> Option<u64> {
    spec.files.iter().map(|file| file.size).sum()
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
pub struct RunRegistry {
    runs: Mutex<HashMap<String, RunState>>,
    changed: tokio::sync::Notify,
}

impl RunRegistry {
    /// Also taken in a record handle's drop, during a panic's unwinding:
    /// a poisoned lock is used as it is, never a second panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunState>> {
        self.runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
                losses: 0,
                taken_over: false,
                bytes_done: 0,
                current_bytes: 0,
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

    /// Reading of the current file reached byte `bytes`.
    pub fn read_to(&self, run_id: &str, uri: &str, bytes: u64) {
        if let Some(run) = self.lock().get_mut(run_id)
            && run.current.as_ref().is_some_and(|(current, _)| current == uri)
        {
            run.current_bytes = run.current_bytes.max(bytes);
        }
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

    /// A row in flight was lost before it settled (a settled one, sent again
    /// by a re-read, changes nothing): the file is to be read again.
    pub fn lost(&self, run_id: &str, uri: &str, line: u64) {
        let mut runs = self.lock();
        let Some(run) = runs.get_mut(run_id) else { return };
        if run.current.as_ref().is_some_and(|(current, progress)| current == uri && !progress.is_settled(line)) {
            run.losses += 1;
            drop(runs);
            self.changed.notify_waiters();
        }
    }

    /// How many rows of the run were lost in flight so far.
    pub fn losses(&self, run_id: &str) -> u64 {
        self.lock().get(run_id).map_or(0, |run| run.losses)
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
            if let Some((uri, progress)) = run.current.take() {
                run.done.add(&progress.counts);
                let size = run.spec.files.iter().find(|file| file.uri == uri).and_then(|file| file.size);
                run.bytes_done += size.unwrap_or(run.current_bytes);
            }
            run.current_bytes = 0;
            run.files_done += 1;
            run.error_files.extend(error_file);
        }
    }

    pub fn finish(&self, run_id: &str, error: Option<String>) {
        if let Some(run) = self.lock().get_mut(run_id) {
            run.status = if error.is_some() { RunStatus::Failed } else { RunStatus::Completed };
            run.error = error.as_deref().map(crate::domain::dead_letter::sanitized_reason);
            run.elapsed = Some(run.started.elapsed().as_secs_f64());
        }
        self.changed.notify_waiters();
    }

    /// The ids of every run this process knows, running or finished.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Whether this process is running `run_id`.
    pub fn is_running(&self, run_id: &str) -> bool {
        self.lock().get(run_id).is_some_and(|run| run.status == RunStatus::Running)
    }

    /// The reports the `batch_runs` table does not have yet: every running
    /// run's progress, and each finished run's final report until it is
    /// recorded ([`RunRegistry::recorded`]).
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
        let bytes_total = total_bytes(spec);
        RunReport {
            bytes_read: 0,
            bytes_total,
            percent: bytes_total.map(|_| 0.0),
            eta_seconds: None,
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
        let bytes_read = run.bytes_done + run.current_bytes;
        let bytes_total = total_bytes(&run.spec);
        let (percent, eta_seconds) = match (run.status, bytes_total) {
            (RunStatus::Completed, _) => (Some(100.0), Some(0.0)),
            (_, None) => (None, None),
            (status, Some(total)) => {
                let estimate = crate::domain::progress::estimate(bytes_read, total, bytes_read, elapsed);
                // Read to the end is not done: the last rows are still in flight.
                let percent = estimate.percent.min(99.9);
                (Some(percent), estimate.eta_seconds.filter(|_| status == RunStatus::Running))
            }
        };
        Some(RunReport {
            bytes_read,
            bytes_total,
            percent,
            eta_seconds,
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
        let runs = RunRegistry::default();
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
    fn a_row_lost_before_it_settled_counts_as_a_loss_and_a_settled_one_does_not() {
        let runs = RunRegistry::default();
        let spec = RunSpec { run_id: "r".into(), uri: "s3://b/k.csv".into(), files: vec![], errors_per_file: false };
        runs.begin(spec, 4).unwrap();
        runs.start_file("r", "s3://b/k.csv");
        for line in 1..=3 {
            assert_eq!(runs.row("r", "s3://b/k.csv", line, || Ok(())).0, RowAction::Send);
        }
        runs.settle("r", "s3://b/k.csv", [(1, RowOutcome::Predicted)]);
        runs.lost("r", "s3://b/k.csv", 1);
        assert_eq!(runs.losses("r"), 0, "line 1 is settled: a second copy lost changes nothing");
        runs.lost("r", "s3://b/k.csv", 2);
        runs.lost("r", "s3://other.csv", 3);
        runs.lost("unknown", "s3://b/k.csv", 3);
        assert_eq!(runs.losses("r"), 1, "only the current file's unsettled rows count");
        assert_eq!(runs.resume_line("r", "s3://b/k.csv"), 2, "reading starts again at the lost row");
    }

    #[test]
    fn a_run_is_recorded_until_its_final_report_is_in_and_a_takeover_is_said_once() {
        let runs = RunRegistry::default();
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
    #[test]
    fn the_percent_follows_the_bytes_read_and_reaches_100_only_when_completed() {
        use crate::batch::{InputFile, Location};
        let file = |name: &str, size: Option<u64>| InputFile {
            location: Location::Local(name.into()),
            uri: name.into(),
            delimiter: b';',
            layout: crate::domain::csv_rules::CsvLayout::from_header(crate::domain::csv_rules::REQUIRED_COLUMNS)
                .unwrap(),
            size,
        };
        let runs = RunRegistry::default();
        let spec = RunSpec {
            run_id: "r".into(),
            uri: "dir/".into(),
            files: vec![file("a.csv", Some(100)), file("b.csv", Some(300))],
            errors_per_file: true,
        };
        runs.begin(spec, 1).unwrap();
        let at = |runs: &RunRegistry| {
            let report = runs.report("r").unwrap();
            (report.bytes_read, report.bytes_total, report.percent)
        };
        assert_eq!(at(&runs), (0, Some(400), Some(0.0)));
        runs.start_file("r", "a.csv");
        runs.read_to("r", "a.csv", 50);
        assert_eq!(at(&runs), (50, Some(400), Some(12.5)));
        runs.read_to("r", "b.csv", 90); // not the current file: ignored
        runs.file_done("r", None);
        runs.start_file("r", "b.csv");
        runs.read_to("r", "b.csv", 300);
        // Read to the end, rows still in flight: not 100 yet.
        assert_eq!(at(&runs), (400, Some(400), Some(99.9)));
        runs.file_done("r", None);
        runs.finish("r", None);
        let done = runs.report("r").unwrap();
        assert_eq!((done.percent, done.eta_seconds), (Some(100.0), Some(0.0)));
        // A file of unknown size leaves the run without a percent.
        let unknown = RunSpec {
            run_id: "u".into(),
            uri: "dir/".into(),
            files: vec![file("a.csv", Some(100)), file("c.csv", None)],
            errors_per_file: true,
        };
        runs.begin(unknown, 2).unwrap();
        let report = runs.report("u").unwrap();
        assert_eq!((report.bytes_total, report.percent, report.eta_seconds), (None, None, None));
    }
}
