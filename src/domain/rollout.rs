//! Model rollouts: what a re-prediction run selects, and how two models'
//! answers over the same transactions compare.

use chrono::{DateTime, NaiveDate, Utc};
use std::collections::BTreeMap;

use super::prediction::MODEL_VERSION_MAX_CHARS;

/// The stored transactions a re-prediction run predicts again: those whose
/// `timestamp` is in `[since, until)` and whose current prediction is
/// `from_model`'s; `None` bounds nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub from_model: Option<String>,
}

impl Selection {
    /// Reads the options as given on the command line or in a request
    /// body, naming the one that is wrong.
    pub fn parse(since: Option<&str>, until: Option<&str>, from_model: Option<&str>) -> Result<Selection, String> {
        let since = since.map(|text| parse_bound("since", text)).transpose()?;
        let until = until.map(|text| parse_bound("until", text)).transpose()?;
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(format!("since ({since}) must be before until ({until})"));
        }
        let from_model = from_model.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        if let Some(version) = &from_model
            && version.chars().count() > MODEL_VERSION_MAX_CHARS
        {
            return Err(format!("from_model: longer than {MODEL_VERSION_MAX_CHARS} characters"));
        }
        Ok(Selection { since, until, from_model })
    }
}

/// A date (`2026-12-01`, midnight UTC) or a date-time (RFC 3339, or
/// without a zone as UTC).
fn parse_bound(name: &str, text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(date) = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    super::timestamp::parse_timestamp(text).map_err(|reason| format!("{name}: {reason}"))
}

/// How model `b` answered the transactions model `a` answered too: the
/// count of each (category of a, category of b) pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confusion {
    pub pairs: BTreeMap<(String, String), u64>,
}

impl Confusion {
    pub fn add(&mut self, a: &str, b: &str, count: u64) {
        *self.pairs.entry((a.to_string(), b.to_string())).or_default() += count;
    }

    /// Transactions both models have predicted.
    pub fn total(&self) -> u64 {
        self.pairs.values().sum()
    }

    /// Those on which they agree.
    pub fn agreed(&self) -> u64 {
        self.pairs.iter().filter(|((a, b), _)| a == b).map(|(_, n)| n).sum()
    }

    /// The agreement share in percent (0 when there is nothing to compare).
    pub fn agreement_pct(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            total => 100.0 * self.agreed() as f64 / total as f64,
        }
    }

    /// One line per pair: `a_category,b_category,transactions`, with a header.
    pub fn to_csv(&self, a: &str, b: &str) -> String {
        let mut out = format!("{},{},transactions\n", csv_field(a), csv_field(b));
        for ((category_a, category_b), count) in &self.pairs {
            out.push_str(&format!("{},{},{count}\n", csv_field(category_a), csv_field(category_b)));
        }
        out
    }

    /// The table for a terminal: a row per category of `a`, with its
    /// count, the share `b` agrees on, and `b`'s answers for it, most
    /// frequent first.
    pub fn to_table(&self, a: &str, b: &str) -> String {
        let mut rows: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
        for ((category_a, category_b), count) in &self.pairs {
            rows.entry(category_a).or_default().push((category_b, *count));
        }
        let mut out = format!(
            "{a} vs {b}: {} transactions predicted by both, {} agree ({:.2}%)\n",
            self.total(),
            self.agreed(),
            self.agreement_pct()
        );
        let width = rows.keys().map(|c| c.chars().count()).max().unwrap_or(0).max(a.chars().count());
        out.push_str(&format!("{:width$}  {:>12}  {:>7}  {b}\n", a, "transactions", "agree"));
        for (category_a, mut answers) in rows {
            answers.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(y.0)));
            let total: u64 = answers.iter().map(|(_, n)| n).sum();
            let agreed: u64 = answers.iter().filter(|(c, _)| *c == category_a).map(|(_, n)| n).sum();
            let described: Vec<String> = answers.iter().map(|(c, n)| format!("{c} {n}")).collect();
            out.push_str(&format!(
                "{category_a:width$}  {total:>12}  {:>6.1}%  {}\n",
                100.0 * agreed as f64 / total as f64,
                described.join(", ")
            ));
        }
        out
    }
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_reads_dates_and_date_times_and_names_the_bad_option() {
        let selection = Selection::parse(Some("2026-01-01"), Some("2026-02-01T12:00:00Z"), Some(" v1 ")).unwrap();
        assert_eq!(selection.since.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(selection.until.unwrap().to_rfc3339(), "2026-02-01T12:00:00+00:00");
        assert_eq!(selection.from_model.as_deref(), Some("v1"));
        assert_eq!(Selection::parse(None, None, Some("")).unwrap(), Selection::default());
        assert!(Selection::parse(Some("yesterday"), None, None).unwrap_err().starts_with("since: "));
        assert!(Selection::parse(None, Some("2026-13-01"), None).unwrap_err().starts_with("until: "));
        let reversed = Selection::parse(Some("2026-02-01"), Some("2026-01-01"), None).unwrap_err();
        assert!(reversed.contains("must be before"), "{reversed}");
        assert!(Selection::parse(None, None, Some(&"v".repeat(51))).unwrap_err().starts_with("from_model: "));
    }

    #[test]
    fn the_confusion_table_counts_agreement_and_writes_csv() {
        let mut confusion = Confusion::default();
        confusion.add("Food", "Food", 3);
        confusion.add("Food", "Rent", 1);
        confusion.add("Rent", "Travel, abroad", 4);
        assert_eq!((confusion.total(), confusion.agreed()), (8, 3));
        assert_eq!(confusion.agreement_pct(), 37.5);
        assert_eq!(
            confusion.to_csv("v1", "v2"),
            "v1,v2,transactions\nFood,Food,3\nFood,Rent,1\nRent,\"Travel, abroad\",4\n"
        );
        let table = confusion.to_table("v1", "v2");
        assert!(table.starts_with("v1 vs v2: 8 transactions predicted by both, 3 agree (37.50%)\n"), "{table}");
        assert!(table.contains("Food             4    75.0%  Food 3, Rent 1\n"), "{table}");
        assert_eq!(Confusion::default().agreement_pct(), 0.0);
    }
}
