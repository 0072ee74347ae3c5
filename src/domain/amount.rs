//! Money amounts, held as an exact number of cents.
//!
//! An amount has at most 2 decimals and |amount| < 10^10, so every valid
//! amount fits in an `i64` of cents. Keeping cents avoids float rounding all
//! the way to PostgreSQL's NUMERIC(12,2).

use std::fmt;

/// |amount| must stay below 10^10 units, that is 10^12 cents.
const MAX_ABS_CENTS: i64 = 1_000_000_000_000;

/// An exact amount in cents. Negative amounts are debits by convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount {
    cents: i64,
}

/// Why a value is not an amount. The text is user-facing (DLQ, error files).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("not a number: {0:?}")]
    NotANumber(String),
    #[error("more than 2 decimals: {0:?}")]
    TooPrecise(String),
    #[error("out of range (|amount| must be < 10^10): {0:?}")]
    OutOfRange(String),
    #[error("not a finite number")]
    NotFinite,
}

/// Which decimal separator a text amount may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecimalSeparator {
    /// `12.34` only (JSON strings).
    Dot,
    /// `12.34` or `12,34` (CSV files such as the seed's French export).
    DotOrComma,
}

impl Amount {
    pub fn from_cents(cents: i64) -> Result<Self, AmountError> {
        if cents.unsigned_abs() >= MAX_ABS_CENTS as u64 {
            return Err(AmountError::OutOfRange(Amount { cents }.to_string()));
        }
        Ok(Amount { cents })
    }

    pub fn cents(self) -> i64 {
        self.cents
    }

    /// Parses a decimal text such as `-952,40`, `12.5` or `+3`.
    ///
    /// Trailing zeros beyond two decimals are accepted (`1.500`), any other
    /// third decimal is not: rounding money silently would change it.
    pub fn parse(text: &str, separator: DecimalSeparator) -> Result<Self, AmountError> {
        let trimmed = text.trim();
        let not_a_number = || AmountError::NotANumber(text.to_string());
        let (negative, unsigned) = match trimmed.as_bytes().first() {
            Some(b'-') => (true, &trimmed[1..]),
            Some(b'+') => (false, &trimmed[1..]),
            _ => (false, trimmed),
        };
        let split_at = unsigned.find(|c| c == '.' || (c == ',' && separator == DecimalSeparator::DotOrComma));
        let (whole, fraction) = match split_at {
            Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
            None => (unsigned, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
            return Err(not_a_number());
        }
        let significant_fraction = fraction.trim_end_matches('0');
        if significant_fraction.len() > 2 {
            return Err(AmountError::TooPrecise(text.to_string()));
        }
        let whole = whole.trim_start_matches('0');
        // 10 integer digits or more is always out of range; checking the
        // length first also keeps the arithmetic below from overflowing.
        if whole.len() > 10 {
            return Err(AmountError::OutOfRange(text.to_string()));
        }
        let whole_value: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| not_a_number())? };
        let mut fraction_cents: i64 = 0;
        for (i, digit) in significant_fraction.bytes().enumerate() {
            fraction_cents += i64::from(digit - b'0') * if i == 0 { 10 } else { 1 };
        }
        let cents = whole_value * 100 + fraction_cents;
        Amount::from_cents(if negative { -cents } else { cents }).map_err(|_| AmountError::OutOfRange(text.to_string()))
    }

    /// Converts a JSON number. Integers are exact; a float goes through its
    /// shortest round-trip decimal text, which for any amount with at most
    /// two decimals in range is exactly the text that was sent.
    pub fn from_json_number(number: &serde_json::Number) -> Result<Self, AmountError> {
        if let Some(integer) = number.as_i64() {
            return integer
                .checked_mul(100)
                .ok_or_else(|| AmountError::OutOfRange(number.to_string()))
                .and_then(Amount::from_cents)
                .map_err(|_| AmountError::OutOfRange(number.to_string()));
        }
        if number.is_u64() {
            return Err(AmountError::OutOfRange(number.to_string()));
        }
        let float = number.as_f64().ok_or(AmountError::NotFinite)?;
        if !float.is_finite() {
            return Err(AmountError::NotFinite);
        }
        if float.abs() >= 1e10 {
            return Err(AmountError::OutOfRange(number.to_string()));
        }
        Amount::parse(&format!("{float}"), DecimalSeparator::Dot)
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.cents < 0 { "-" } else { "" };
        let abs = self.cents.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DecimalSeparator::*;

    fn cents(text: &str, separator: DecimalSeparator) -> Result<i64, AmountError> {
        Amount::parse(text, separator).map(Amount::cents)
    }

    #[test]
    fn parses_dot_and_comma_decimals() {
        assert_eq!(cents("-952,40", DotOrComma), Ok(-95240));
        assert_eq!(cents("184.91", Dot), Ok(18491));
        assert_eq!(cents("12.5", Dot), Ok(1250));
        assert_eq!(cents("+3", Dot), Ok(300));
        assert_eq!(cents(".5", Dot), Ok(50));
        assert_eq!(cents("7.", Dot), Ok(700));
        assert_eq!(cents("1.500", Dot), Ok(150));
        assert_eq!(cents(" 0 ", Dot), Ok(0));
    }

    #[test]
    fn rejects_what_is_not_an_amount() {
        assert!(matches!(cents("abc", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents(".", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("-", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("1,5", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("1.2.3", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("1e3", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("NaN", Dot), Err(AmountError::NotANumber(_))));
        assert!(matches!(cents("1.234", Dot), Err(AmountError::TooPrecise(_))));
        assert!(matches!(cents("10000000000", Dot), Err(AmountError::OutOfRange(_))));
        assert!(matches!(cents("99999999999999999999999", Dot), Err(AmountError::OutOfRange(_))));
        assert_eq!(cents("9999999999.99", Dot), Ok(999_999_999_999));
        assert_eq!(cents("-9999999999.99", Dot), Ok(-999_999_999_999));
    }

    #[test]
    fn converts_json_numbers_exactly() {
        let number = |text: &str| serde_json::from_str::<serde_json::Number>(text).unwrap();
        assert_eq!(Amount::from_json_number(&number("-749.56")).map(Amount::cents), Ok(-74956));
        assert_eq!(Amount::from_json_number(&number("0.1")).map(Amount::cents), Ok(10));
        assert_eq!(Amount::from_json_number(&number("42")).map(Amount::cents), Ok(4200));
        assert_eq!(Amount::from_json_number(&number("1e2")).map(Amount::cents), Ok(10000));
        assert_eq!(Amount::from_json_number(&number("9999999999.99")).map(Amount::cents), Ok(999_999_999_999));
        assert!(matches!(Amount::from_json_number(&number("0.001")), Err(AmountError::TooPrecise(_))));
        assert!(matches!(Amount::from_json_number(&number("1e300")), Err(AmountError::OutOfRange(_))));
        assert!(matches!(Amount::from_json_number(&number("18446744073709551615")), Err(AmountError::OutOfRange(_))));
        assert!(matches!(Amount::from_json_number(&number("-9223372036854775808")), Err(AmountError::OutOfRange(_))));
    }

    #[test]
    fn displays_with_two_decimals() {
        assert_eq!(Amount::from_cents(-95240).unwrap().to_string(), "-952.40");
        assert_eq!(Amount::from_cents(5).unwrap().to_string(), "0.05");
        assert_eq!(Amount::from_cents(-5).unwrap().to_string(), "-0.05");
    }
}
