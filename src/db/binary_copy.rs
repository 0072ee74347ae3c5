//! PostgreSQL's binary `COPY` format, written by hand for the columns
//! txnflow stores: fewer bytes and no text parsing in the server, which is
//! what makes `COPY … (FORMAT binary)` the fastest way in.
//!
//! A stream is a header, then per row a field count and each field as its
//! length (-1 for NULL) and its value in the type's binary (network order)
//! representation, then a trailer.

use chrono::{DateTime, Utc};

/// "PGCOPY\n\377\r\n\0", no flags, no header extension.
const HEADER: [u8; 19] = [b'P', b'G', b'C', b'O', b'P', b'Y', b'\n', 0xFF, b'\r', b'\n', 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A binary COPY stream being written, row by row.
pub struct BinaryCopy {
    bytes: Vec<u8>,
}

impl BinaryCopy {
    /// A stream with room for about `rows` rows of `row_bytes` each.
    pub fn with_capacity(rows: usize, row_bytes: usize) -> BinaryCopy {
        let mut bytes = Vec::with_capacity(HEADER.len() + rows * row_bytes + 2);
        bytes.extend_from_slice(&HEADER);
        BinaryCopy { bytes }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.bytes.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, value: &[u8]) -> &mut Self {
        let length = i32::try_from(value.len()).expect("a field is far under 2 GiB");
        self.bytes.extend_from_slice(&length.to_be_bytes());
        self.bytes.extend_from_slice(value);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.bytes.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    pub fn uuid(&mut self, value: &uuid::Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn optional_text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    pub fn float8(&mut self, value: f64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn timestamptz(&mut self, value: &DateTime<Utc>) -> &mut Self {
        self.field(&(value.timestamp_micros() - POSTGRES_EPOCH_MICROS).to_be_bytes())
    }

    /// A `numeric` of scale 2, from cents.
    pub fn numeric_cents(&mut self, cents: i64) -> &mut Self {
        let mut value = [0u8; 8 + 2 * MAX_DIGITS];
        let length = numeric_cents(cents, &mut value);
        self.field(&value[..length])
    }

    /// The finished stream, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&(-1i16).to_be_bytes());
        self.bytes
    }
}

/// Base-10000 digits of an i64 of cents: at most 5 for the whole part
/// (i64::MAX / 100 < 10^17) and 1 for the cents.
const MAX_DIGITS: usize = 6;

/// Writes `cents / 100` in `numeric`'s binary form into `out` and returns
/// its length: the digit count, the weight (of the first digit, in powers
/// of 10,000), the sign, the display scale (2), then the base-10,000
/// digits, with leading and trailing zero digits left out, as PostgreSQL's
/// own encoder does.
fn numeric_cents(cents: i64, out: &mut [u8]) -> usize {
    const POSITIVE: u16 = 0x0000;
    const NEGATIVE: u16 = 0x4000;
    let sign = if cents < 0 { NEGATIVE } else { POSITIVE };
    let magnitude = cents.unsigned_abs();
    let (mut whole, fraction) = (magnitude / 100, (magnitude % 100) as u16 * 100);
    // Digits from the last (the fraction, weight -1) to the first.
    let mut digits = [0u16; MAX_DIGITS];
    let mut count = 0;
    digits[count] = fraction;
    count += 1;
    while whole > 0 {
        digits[count] = (whole % 10_000) as u16;
        whole /= 10_000;
        count += 1;
    }
    // `digits[..count]` is least significant first; the first (most
    // significant) has weight count - 2.
    let mut weight = count as i16 - 2;
    let mut high = count;
    while high > 0 && digits[high - 1] == 0 {
        high -= 1;
        weight -= 1;
    }
    let mut low = 0;
    while low < high && digits[low] == 0 {
        low += 1;
    }
    let ndigits = high - low;
    if ndigits == 0 {
        weight = 0;
    }
    out[0..2].copy_from_slice(&(ndigits as i16).to_be_bytes());
    out[2..4].copy_from_slice(&weight.to_be_bytes());
    out[4..6].copy_from_slice(&if ndigits == 0 { POSITIVE } else { sign }.to_be_bytes());
    out[6..8].copy_from_slice(&2i16.to_be_bytes());
    for (i, digit) in digits[low..high].iter().rev().enumerate() {
        out[8 + 2 * i..10 + 2 * i].copy_from_slice(&digit.to_be_bytes());
    }
    8 + 2 * ndigits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (ndigits, weight, sign, dscale, digits) of an encoded numeric.
    fn decoded(cents: i64) -> (i16, i16, u16, i16, Vec<u16>) {
        let mut out = [0u8; 8 + 2 * MAX_DIGITS];
        let length = numeric_cents(cents, &mut out);
        let word = |i: usize| [out[i], out[i + 1]];
        let digits = (8..length).step_by(2).map(|i| u16::from_be_bytes(word(i))).collect();
        (
            i16::from_be_bytes(word(0)),
            i16::from_be_bytes(word(2)),
            u16::from_be_bytes(word(4)),
            i16::from_be_bytes(word(6)),
            digits,
        )
    }

    #[test]
    fn numeric_digits_are_base_ten_thousand_without_leading_or_trailing_zeros() {
        assert_eq!(decoded(0), (0, 0, 0, 2, vec![]));
        assert_eq!(decoded(95_240), (2, 0, 0, 2, vec![952, 4000]), "952.40");
        assert_eq!(decoded(-95_240), (2, 0, 0x4000, 2, vec![952, 4000]), "-952.40");
        assert_eq!(decoded(5), (1, -1, 0, 2, vec![500]), "0.05");
        assert_eq!(decoded(100), (1, 0, 0, 2, vec![1]), "1.00");
        assert_eq!(decoded(1_000_000), (1, 1, 0, 2, vec![1]), "10000.00");
        assert_eq!(decoded(1_000_001), (3, 1, 0, 2, vec![1, 0, 100]), "10000.01");
        assert_eq!(decoded(999_999_999_999), (4, 2, 0, 2, vec![99, 9999, 9999, 9900]), "9999999999.99");
        assert_eq!(decoded(i64::MIN).0, 6, "the widest value fits");
    }

    #[test]
    fn a_stream_is_a_header_rows_of_length_prefixed_fields_and_a_trailer() {
        let mut copy = BinaryCopy::with_capacity(1, 32);
        copy.row(3).text("ab").null().float8(1.0);
        let bytes = copy.finish();
        assert_eq!(&bytes[..19], &HEADER);
        let row = &bytes[19..];
        assert_eq!(&row[..2], &3i16.to_be_bytes());
        assert_eq!(&row[2..8], &[0, 0, 0, 2, b'a', b'b']);
        assert_eq!(&row[8..12], &(-1i32).to_be_bytes());
        assert_eq!(&row[12..16], &8i32.to_be_bytes());
        assert_eq!(&row[16..24], &1.0f64.to_be_bytes());
        assert_eq!(&row[24..], &(-1i16).to_be_bytes());
    }

    #[test]
    fn timestamps_count_microseconds_from_2000() {
        let mut copy = BinaryCopy::with_capacity(1, 16);
        let at = DateTime::parse_from_rfc3339("2000-01-01T00:00:01.000002Z").unwrap().with_timezone(&Utc);
        copy.row(1).timestamptz(&at);
        let bytes = copy.finish();
        assert_eq!(&bytes[21..25], &8i32.to_be_bytes());
        assert_eq!(&bytes[25..33], &1_000_002i64.to_be_bytes());
    }
}
