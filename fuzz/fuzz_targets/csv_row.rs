//! The CSV rules on arbitrary bytes, as the CsvLoader applies them: the
//! delimiter from the first line, the header mapped to the columns, then
//! each row mapped and validated. Never a panic.
#![no_main]

#[path = "../../src/domain/mod.rs"]
#[allow(dead_code)]
mod domain;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let delimiter = domain::csv_rules::detect_delimiter(data);
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).delimiter(delimiter).from_reader(data);
    let mut records = reader.byte_records();
    let Some(Ok(header)) = records.next() else { return };
    let Ok(names) = header.iter().map(std::str::from_utf8).collect::<Result<Vec<_>, _>>() else { return };
    let Ok(layout) = domain::csv_rules::CsvLayout::from_header(names) else { return };
    for record in records.flatten() {
        let Ok(fields) = record.iter().map(std::str::from_utf8).collect::<Result<Vec<_>, _>>() else { continue };
        let _ = layout.row_json(&fields);
        if let Ok(raw) = layout.raw_transaction(&fields) {
            let _ = domain::validation::validate(&raw);
        }
    }
});
