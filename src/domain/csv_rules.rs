//! CSV row rules: delimiter detection, header mapping, and the
//! mapping of one row's fields to a [`RawTransaction`].
//!
//! Reading bytes is the CsvLoader's job; these functions only look at a
//! header line and at fields already split by the `csv` crate.

use super::amount::DecimalSeparator;
use super::transaction::Transaction;
use super::validation::{RawField, RawTransaction};

/// The columns a transaction file must have, in any order.
pub const REQUIRED_COLUMNS: [&str; 7] =
    ["id", "description", "amount", "timestamp", "merchant", "operation_type", "side"];

/// The header of the seed system's files.
pub const SEED_HEADER: &str = "id;description;amount;timestamp;merchant;operation_type;side";

/// A transaction as a row of the seed system's files (no line end): `;`
/// separators, a decimal comma, quoted text, the timestamp without a zone.
pub fn seed_row(transaction: &Transaction) -> String {
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    let cents = transaction.amount.cents();
    format!(
        "{};{};{}{},{:02};{};{};{};{}",
        transaction.id,
        quote(&transaction.description),
        if cents < 0 { "-" } else { "" },
        cents.unsigned_abs() / 100,
        cents.unsigned_abs() % 100,
        quote(&transaction.timestamp.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
        quote(transaction.merchant.as_deref().unwrap_or_default()),
        quote(&transaction.operation_type),
        quote(transaction.side.as_str()),
    )
}

/// Optional lineage columns that are read when present.
const OPTIONAL_COLUMNS: [&str; 2] = ["processing_type", "run_id"];

const UTF8_BOM: &str = "\u{feff}";

/// Picks `;` or `,`: whichever occurs more often outside quotes in the
/// header line. A tie (for example a one-column header) means `,`.
pub fn detect_delimiter(header_line: &[u8]) -> u8 {
    let (mut semicolons, mut commas, mut quoted) = (0usize, 0usize, false);
    for &byte in header_line {
        match byte {
            b'"' => quoted = !quoted,
            b';' if !quoted => semicolons += 1,
            b',' if !quoted => commas += 1,
            b'\n' if !quoted => break,
            _ => {}
        }
    }
    if semicolons > commas { b';' } else { b',' }
}

/// Why a header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Names the missing columns only: the line found may be anything,
    /// even a secret, and is never repeated.
    #[error("the header lacks the required column(s) {}", missing.join(", "))]
    MissingColumns { missing: Vec<&'static str> },
    #[error("the header names column {0:?} twice")]
    DuplicateColumn(String),
}

/// Why a row cannot be mapped to fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("expected {expected} columns, found {found}")]
    ColumnCount { expected: usize, found: usize },
}

/// Where each known column sits in a file's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvLayout {
    /// The header as written (BOM removed), for error files and DLQ values.
    pub headers: Vec<String>,
    required: [usize; 7],
    optional: [Option<usize>; 2],
}

impl CsvLayout {
    /// Maps a header to the known columns. Names are matched trimmed and
    /// case-insensitively; unknown columns are ignored.
    pub fn from_header<'a>(headers: impl IntoIterator<Item = &'a str>) -> Result<CsvLayout, HeaderError> {
        let headers: Vec<String> = headers
            .into_iter()
            .enumerate()
            .map(|(i, name)| if i == 0 { name.trim_start_matches(UTF8_BOM) } else { name }.to_string())
            .collect();
        let normalised: Vec<String> = headers.iter().map(|name| name.trim().to_ascii_lowercase()).collect();
        let position = |column: &str| -> Result<Option<usize>, HeaderError> {
            let mut found = normalised.iter().enumerate().filter(|(_, name)| *name == column).map(|(i, _)| i);
            let first = found.next();
            match found.next() {
                Some(_) => Err(HeaderError::DuplicateColumn(column.to_string())),
                None => Ok(first),
            }
        };
        let mut required = [0usize; 7];
        let mut missing = Vec::new();
        for (slot, column) in required.iter_mut().zip(REQUIRED_COLUMNS) {
            match position(column)? {
                Some(index) => *slot = index,
                None => missing.push(column),
            }
        }
        if !missing.is_empty() {
            return Err(HeaderError::MissingColumns { missing });
        }
        let optional = [position(OPTIONAL_COLUMNS[0])?, position(OPTIONAL_COLUMNS[1])?];
        Ok(CsvLayout { headers, required, optional })
    }

    pub fn width(&self) -> usize {
        self.headers.len()
    }

    /// Maps one row's fields. Text stays text; validation applies the rules.
    /// An empty merchant is a null merchant: CSV has no other way to say so.
    pub fn raw_transaction<S: AsRef<str>>(&self, fields: &[S]) -> Result<RawTransaction, RowError> {
        if fields.len() != self.width() {
            return Err(RowError::ColumnCount { expected: self.width(), found: fields.len() });
        }
        let text = |index: usize| RawField::Text(fields[index].as_ref().to_string());
        let optional = |index: Option<usize>| match index.map(|i| fields[i].as_ref()) {
            None | Some("") => RawField::Missing,
            Some(value) => RawField::Text(value.to_string()),
        };
        let [id, description, amount, timestamp, merchant, operation_type, side] = self.required;
        Ok(RawTransaction {
            id: text(id),
            description: text(description),
            amount: text(amount),
            timestamp: text(timestamp),
            merchant: optional(Some(merchant)),
            operation_type: text(operation_type),
            side: text(side),
            processing_type: optional(self.optional[0]),
            run_id: optional(self.optional[1]),
            batch_id: RawField::Missing,
            decimal_separator: DecimalSeparator::DotOrComma,
        })
    }

    /// The row as a JSON object keyed by header, the DLQ value of a CSV row.
    /// Rows of the wrong width keep every field: extra ones under `_extra_N`.
    pub fn row_json<S: AsRef<str>>(&self, fields: &[S]) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        for (i, value) in fields.iter().enumerate() {
            let key = self.headers.get(i).cloned().unwrap_or_else(|| format!("_extra_{i}"));
            object.insert(key, serde_json::Value::String(value.as_ref().to_string()));
        }
        serde_json::Value::Object(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::validation::validate;

    fn split(line: &str, delimiter: u8) -> Vec<String> {
        let mut reader = csv::ReaderBuilder::new().has_headers(false).delimiter(delimiter).from_reader(line.as_bytes());
        reader.records().next().unwrap().unwrap().iter().map(str::to_string).collect()
    }

    #[test]
    fn detects_the_delimiter() {
        assert_eq!(detect_delimiter(SEED_HEADER.as_bytes()), b';');
        assert_eq!(detect_delimiter(b"id,description,amount,timestamp,merchant,operation_type,side"), b',');
        assert_eq!(detect_delimiter(b"\"a;b\",c,d\n1;2;3;4;5"), b',');
        assert_eq!(detect_delimiter(b"id"), b',');
    }

    #[test]
    fn the_seed_files_rows_load_as_they_are() {
        let layout = CsvLayout::from_header(split(SEED_HEADER, b';').iter().map(String::as_str)).unwrap();
        let row = split(r#"1;"Card expense at EDF";-952,40;"2023-11-28 06:35:12";"EDF";"refund";"debit""#, b';');
        let transaction = validate(&layout.raw_transaction(&row).unwrap()).unwrap();
        assert_eq!(transaction.id.to_string(), "e15d1546-4798-54fb-b2ff-35d10197b1b9");
        assert_eq!(transaction.description, "Card expense at EDF");
        assert_eq!(transaction.amount.to_string(), "-952.40");
        assert_eq!(transaction.timestamp.to_rfc3339(), "2023-11-28T06:35:12+00:00");
        assert_eq!(transaction.merchant.as_deref(), Some("EDF"));
        assert_eq!(transaction.operation_type, "refund");
    }

    #[test]
    fn columns_may_be_shuffled_extra_and_bom_prefixed() {
        let header = "\u{feff}Side,amount,extra,timestamp,ID,merchant,description,operation_type";
        let layout = CsvLayout::from_header(split(header, b',').iter().map(String::as_str)).unwrap();
        assert_eq!(layout.headers[0], "Side");
        let row = split("credit,184.91,ignored,2023-11-03T11:49:37Z,3,,\"Receipt, Darty\",refund", b',');
        let transaction = validate(&layout.raw_transaction(&row).unwrap()).unwrap();
        assert_eq!(transaction.amount.cents(), 18491);
        assert_eq!(transaction.merchant, None);
        assert_eq!(transaction.description, "Receipt, Darty");
        assert_eq!(transaction.side.as_str(), "credit");
    }

    #[test]
    fn a_header_without_required_columns_names_them() {
        let error = CsvLayout::from_header(["id", "amount", "side", "when"]).unwrap_err();
        assert_eq!(
            error,
            HeaderError::MissingColumns { missing: vec!["description", "timestamp", "merchant", "operation_type"] }
        );
        assert_eq!(
            error.to_string(),
            "the header lacks the required column(s) description, timestamp, merchant, operation_type"
        );
        let duplicate = CsvLayout::from_header(REQUIRED_COLUMNS.iter().copied().chain(["ID"])).unwrap_err();
        assert_eq!(duplicate, HeaderError::DuplicateColumn("id".into()));
    }

    #[test]
    fn a_row_of_the_wrong_width_is_an_error() {
        let layout = CsvLayout::from_header(REQUIRED_COLUMNS).unwrap();
        assert_eq!(layout.raw_transaction(&["1", "2"]), Err(RowError::ColumnCount { expected: 7, found: 2 }));
        assert_eq!(layout.row_json(&["1", "2"]), serde_json::json!({"id": "1", "description": "2"}));
        let wide = ["a", "b", "c", "d", "e", "f", "g", "h"];
        assert_eq!(layout.row_json(&wide)["_extra_7"], "h");
    }

    #[test]
    fn a_seed_row_reads_back_as_the_same_transaction() {
        let layout = CsvLayout::from_header(split(SEED_HEADER, b';').iter().map(String::as_str)).unwrap();
        let raw = layout
            .raw_transaction(&split(
                "7;\"Say \"\"hi\"\"; now\";-0,05;\"2026-01-02 03:04:05.123456\";\"\";\"fee\";\"debit\"",
                b';',
            ))
            .unwrap();
        let transaction = validate(&raw).unwrap();
        let again = validate(&layout.raw_transaction(&split(&seed_row(&transaction), b';')).unwrap()).unwrap();
        assert_eq!(again, transaction);
        assert_eq!(transaction.description, "Say \"hi\"; now");
        assert_eq!(transaction.amount.cents(), -5);
    }
}
