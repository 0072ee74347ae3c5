//! The progress of a batch run over one file: which lines are
//! settled, where reading must start again after in-flight work was lost,
//! and the run's counts.
//!
//! A line is *settled* once nothing more will happen to it: an invalid row is
//! in the error file; a valid row is written with its prediction, or written
//! and dead-lettered as `prediction_failed`, or dead-lettered as
//! `persist_failed`. A row settles once: after a re-read, a second outcome
//! for the same line is ignored, so the counts stay exact.
//!
//! Lines below the first unsettled one are forgotten, so memory follows the
//! lines in flight, not the file's size.

use std::collections::VecDeque;

/// What became of a valid row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    /// Written with its prediction.
    Predicted,
    /// Written, and dead-lettered as `prediction_failed`.
    PredictionFailed,
    /// Refused by the database and dead-lettered as `persist_failed`.
    Refused,
    /// Stored before by another run, left as it was.
    AlreadyStored,
}

/// A run's counts, as its summary line prints them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunCounts {
    pub read: u64,
    pub valid: u64,
    pub invalid: u64,
    pub predicted: u64,
    pub written: u64,
    /// Valid rows whose transaction another run stored before, left as
    /// they were: not written again.
    pub already_stored: u64,
    pub dead_lettered: u64,
}

impl RunCounts {
    /// `read N valid V invalid I predicted P written W already-stored A dead-lettered D in T s`.
    pub fn summary(&self, seconds: f64) -> String {
        format!(
            "read {} valid {} invalid {} predicted {} written {} already-stored {} dead-lettered {} in {seconds:.1} s",
            self.read, self.valid, self.invalid, self.predicted, self.written, self.already_stored, self.dead_lettered
        )
    }

    pub fn add(&mut self, other: &RunCounts) {
        self.read += other.read;
        self.valid += other.valid;
        self.invalid += other.invalid;
        self.predicted += other.predicted;
        self.written += other.written;
        self.already_stored += other.already_stored;
        self.dead_lettered += other.dead_lettered;
    }
}

/// What the loader does with a row it has just parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAction {
    /// Send it down the pipeline.
    Send,
    /// Record it in the error file (first sight of an invalid row).
    RecordInvalid,
    /// Nothing: it is settled already (a re-read).
    Skip,
}

/// Whether a parsed row passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Valid,
    Invalid,
}

#[derive(Debug, Clone)]
pub struct FileProgress {
    /// Settled flags for lines `base * 64 ..`, one bit per line.
    words: VecDeque<u64>,
    base: u64,
    /// The last line seen by the first reading; later readings are re-reads.
    read_to: u64,
    /// Valid rows not settled yet.
    pending: u64,
    end_of_file: bool,
    pub counts: RunCounts,
}

impl Default for FileProgress {
    fn default() -> Self {
        // Lines count from 1: line 0 is settled from the start.
        let mut progress = FileProgress {
            words: VecDeque::new(),
            base: 0,
            read_to: 0,
            pending: 0,
            end_of_file: false,
            counts: RunCounts::default(),
        };
        progress.mark(0);
        progress
    }
}

impl FileProgress {
    fn word_and_bit(&mut self, line: u64) -> Option<(usize, u64)> {
        let word = (line / 64).checked_sub(self.base)? as usize;
        while self.words.len() <= word {
            self.words.push_back(0);
        }
        Some((word, 1 << (line % 64)))
    }

    pub fn is_settled(&self, line: u64) -> bool {
        match (line / 64).checked_sub(self.base) {
            None => true,
            Some(word) => self.words.get(word as usize).is_some_and(|w| w & (1 << (line % 64)) != 0),
        }
    }

    /// Sets the line's flag; false when it was set already.
    fn mark(&mut self, line: u64) -> bool {
        let Some((word, bit)) = self.word_and_bit(line) else { return false };
        if self.words[word] & bit != 0 {
            return false;
        }
        self.words[word] |= bit;
        // Forget whole words once every line in them is settled.
        while self.words.len() > 1 && self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 1;
        }
        true
    }

    /// Lines the first reading passed over without a row (the header, the
    /// continuation lines of quoted fields, blank lines) settle at once.
    fn settle_gap(&mut self, up_to_excluding: u64) {
        for line in self.read_to + 1..up_to_excluding {
            self.mark(line);
        }
    }

    /// A row starting at `line` was parsed: what to do with it.
    pub fn row(&mut self, line: u64, kind: RowKind) -> RowAction {
        if line <= self.read_to {
            return if self.is_settled(line) { RowAction::Skip } else { RowAction::Send };
        }
        self.settle_gap(line);
        self.read_to = line;
        self.counts.read += 1;
        match kind {
            RowKind::Valid => {
                self.counts.valid += 1;
                self.pending += 1;
                RowAction::Send
            }
            RowKind::Invalid => {
                self.counts.invalid += 1;
                self.mark(line);
                RowAction::RecordInvalid
            }
        }
    }

    /// The reading reached the end of the file, whose last line is `last_line`.
    pub fn end_of_file(&mut self, last_line: u64) {
        if last_line > self.read_to {
            self.settle_gap(last_line + 1);
            self.read_to = last_line;
        }
        self.end_of_file = true;
    }

    /// A sent row settled; false (and nothing counted) when it had already.
    pub fn settle(&mut self, line: u64, outcome: RowOutcome) -> bool {
        if line > self.read_to || !self.mark(line) {
            return false;
        }
        self.pending -= 1;
        match outcome {
            RowOutcome::Predicted => {
                self.counts.written += 1;
                self.counts.predicted += 1;
            }
            RowOutcome::PredictionFailed => {
                self.counts.written += 1;
                self.counts.dead_lettered += 1;
            }
            RowOutcome::Refused => self.counts.dead_lettered += 1,
            RowOutcome::AlreadyStored => self.counts.already_stored += 1,
        }
        true
    }

    /// Every row is read and settled.
    pub fn is_done(&self) -> bool {
        self.end_of_file && self.pending == 0
    }

    /// Where a re-read must start: the first line not settled (rows before
    /// it are skipped without a look at their flags).
    pub fn resume_line(&self) -> u64 {
        let mut line = self.base * 64;
        while line <= self.read_to && self.is_settled(line) {
            line += 1;
        }
        line
    }

    /// Words of flags kept: what memory the progress holds.
    pub fn words_held(&self) -> usize {
        self.words.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_file_counts_each_row_once() {
        let mut progress = FileProgress::default();
        // Header on line 1, rows on lines 2..=4.
        for line in 2..=4 {
            assert_eq!(progress.row(line, RowKind::Valid), RowAction::Send);
        }
        progress.end_of_file(4);
        assert!(!progress.is_done());
        assert!(progress.settle(2, RowOutcome::Predicted));
        assert!(progress.settle(3, RowOutcome::PredictionFailed));
        assert!(progress.settle(4, RowOutcome::Refused));
        assert!(progress.is_done());
        assert_eq!(
            progress.counts,
            RunCounts { read: 3, valid: 3, invalid: 0, predicted: 1, written: 2, already_stored: 0, dead_lettered: 2 }
        );
        assert_eq!(
            progress.counts.summary(1.25),
            "read 3 valid 3 invalid 0 predicted 1 written 2 already-stored 0 dead-lettered 2 in 1.2 s"
        );
    }

    #[test]
    fn invalid_rows_settle_when_read_and_are_recorded_once() {
        let mut progress = FileProgress::default();
        assert_eq!(progress.row(2, RowKind::Invalid), RowAction::RecordInvalid);
        assert_eq!(progress.row(3, RowKind::Valid), RowAction::Send);
        progress.end_of_file(3);
        assert_eq!(progress.resume_line(), 3);
        // A re-read skips the invalid row: it is never recorded twice.
        assert_eq!(progress.row(2, RowKind::Invalid), RowAction::Skip);
        assert_eq!(progress.row(3, RowKind::Valid), RowAction::Send);
        assert!(progress.settle(3, RowOutcome::Predicted));
        assert!(progress.is_done());
        assert_eq!(progress.counts.read, 2);
        assert_eq!(progress.counts.invalid, 1);
    }

    #[test]
    fn a_re_read_sends_only_unsettled_rows_and_outcomes_count_once() {
        let mut progress = FileProgress::default();
        for line in 2..=10 {
            progress.row(line, RowKind::Valid);
        }
        for line in [2, 3, 4, 6] {
            progress.settle(line, RowOutcome::Predicted);
        }
        // Work was lost: reading starts again at the first unsettled line.
        assert_eq!(progress.resume_line(), 5);
        let resent: Vec<u64> = (2..=10).filter(|&line| progress.row(line, RowKind::Valid) == RowAction::Send).collect();
        assert_eq!(resent, [5, 7, 8, 9, 10]);
        // Rows that were not lost after all settle twice; the second is ignored.
        assert!(!progress.settle(6, RowOutcome::PredictionFailed));
        for line in [5, 7, 8, 9, 10] {
            assert!(progress.settle(line, RowOutcome::Predicted));
        }
        progress.end_of_file(10);
        assert!(progress.is_done());
        assert_eq!(progress.counts.read, 9);
        assert_eq!(progress.counts.predicted, 9);
        assert_eq!(progress.counts.written, 9);
        assert_eq!(progress.counts.dead_lettered, 0);
    }

    #[test]
    fn multi_line_rows_and_trailing_lines_leave_no_gap() {
        let mut progress = FileProgress::default();
        progress.row(2, RowKind::Valid);
        // The row on line 2 spans lines 2..=4; the next starts on line 5.
        progress.row(5, RowKind::Valid);
        progress.settle(2, RowOutcome::Predicted);
        assert_eq!(progress.resume_line(), 5);
        progress.settle(5, RowOutcome::Predicted);
        progress.end_of_file(7);
        assert_eq!(progress.resume_line(), 8);
        assert!(progress.is_done());
    }

    #[test]
    fn a_header_only_file_is_done_at_once() {
        let mut progress = FileProgress::default();
        progress.end_of_file(1);
        assert!(progress.is_done());
        assert_eq!(progress.counts, RunCounts::default());
    }

    #[test]
    fn unknown_or_unread_lines_never_settle() {
        let mut progress = FileProgress::default();
        progress.row(2, RowKind::Valid);
        assert!(!progress.settle(9, RowOutcome::Predicted), "line 9 was never read");
        assert!(!progress.settle(1, RowOutcome::Predicted), "the header is not a row");
        assert_eq!(progress.counts.written, 0);
    }

    #[test]
    fn memory_follows_the_lines_in_flight_not_the_file() {
        let mut progress = FileProgress::default();
        for line in 2..=1_000_000 {
            progress.row(line, RowKind::Valid);
            if line > 500 {
                progress.settle(line - 500, RowOutcome::Predicted);
            }
        }
        assert!(progress.words_held() <= 10, "{} words held", progress.words_held());
        assert_eq!(progress.resume_line(), 1_000_000 - 500 + 1);
    }
}
