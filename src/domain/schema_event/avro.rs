//! Avro bodies: read into raw fields by name, with the writer's schema
//! (a decimal as its exact text), and written from a JSON event.

use std::io::Cursor;

use apache_avro::Schema as AvroSchema;
use apache_avro::types::Value as AvroValue;

use super::{decode_error, float_field, timestamp_field};
use crate::domain::event::RecordError;
use crate::domain::validation::{RawField, RawTransaction};

pub(super) fn decode_avro(schema: &AvroSchema, body: &[u8]) -> Result<RawTransaction, RecordError> {
    let mut reader = Cursor::new(body);
    let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .and_then(|datum| datum.read_value(&mut reader))
        .map_err(|e| decode_error(format!("not an Avro record of its schema: {e}")))?;
    if (reader.position() as usize) < body.len() {
        return Err(decode_error(format!(
            "not an Avro record of its schema: {} bytes left after the record",
            body.len() - reader.position() as usize
        )));
    }
    let (AvroValue::Record(values), AvroSchema::Record(record)) = (value, schema) else {
        return Err(decode_error("the Avro schema is not a record".to_string()));
    };
    Ok(RawTransaction::from_fields(|name| {
        let Some(at) = record.fields.iter().position(|field| field.name == name) else {
            return RawField::Missing;
        };
        values.get(at).map_or(RawField::Missing, |(_, value)| avro_field(value, &record.fields[at].schema))
    }))
}

/// One Avro value as a raw field; `schema` is its writer's schema, which
/// gives a decimal its scale.
fn avro_field(value: &AvroValue, schema: &AvroSchema) -> RawField {
    match (value, schema) {
        (AvroValue::Union(branch, inner), AvroSchema::Union(union)) => match union.variants().get(*branch as usize) {
            Some(variant) => avro_field(inner, variant),
            None => RawField::Composite,
        },
        (AvroValue::Union(_, inner), _) => avro_field(inner, schema),
        (AvroValue::Null, _) => RawField::Null,
        (AvroValue::Boolean(flag), _) => RawField::Bool(*flag),
        (AvroValue::Int(n), _) => RawField::Number((*n).into()),
        (AvroValue::Long(n), _) => RawField::Number((*n).into()),
        (AvroValue::Float(x), _) => float_field(f64::from(*x)),
        (AvroValue::Double(x), _) => float_field(*x),
        (AvroValue::String(text) | AvroValue::Enum(_, text), _) => RawField::Text(text.clone()),
        (AvroValue::Uuid(id), _) => RawField::Text(id.to_string()),
        (AvroValue::Decimal(decimal), AvroSchema::Decimal(decimal_schema)) => match <Vec<u8>>::try_from(decimal) {
            Ok(bytes) => decimal_text(&bytes, decimal_schema.scale),
            Err(_) => RawField::Composite,
        },
        (AvroValue::BigDecimal(decimal), _) => RawField::Text(decimal.to_string()),
        (AvroValue::TimestampMillis(ms) | AvroValue::LocalTimestampMillis(ms), _) => {
            timestamp_field(chrono::DateTime::from_timestamp_millis(*ms))
        }
        (AvroValue::TimestampMicros(us) | AvroValue::LocalTimestampMicros(us), _) => {
            timestamp_field(chrono::DateTime::from_timestamp_micros(*us))
        }
        (AvroValue::TimestampNanos(ns) | AvroValue::LocalTimestampNanos(ns), _) => {
            timestamp_field(Some(chrono::DateTime::from_timestamp_nanos(*ns)))
        }
        _ => RawField::Composite,
    }
}

/// An Avro decimal's two's-complement big-endian unscaled bytes, at
/// `scale`, as exact decimal text. Over 16 bytes (far past any amount
/// validation accepts) it is text that validation refuses.
fn decimal_text(bytes: &[u8], scale: usize) -> RawField {
    if bytes.len() > 16 {
        return RawField::Text(format!("a decimal of {} bytes", bytes.len()));
    }
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut unscaled: i128 = if negative { -1 } else { 0 };
    for byte in bytes {
        unscaled = (unscaled << 8) | i128::from(*byte);
    }
    let digits = unscaled.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    let sign = if negative { "-" } else { "" };
    RawField::Text(if scale == 0 { format!("{sign}{whole}") } else { format!("{sign}{whole}.{fraction}") })
}

pub(super) fn encode_avro(schema: &AvroSchema, event: &serde_json::Value) -> Result<Vec<u8>, String> {
    let AvroSchema::Record(record) = schema else {
        return Err("the Avro schema is not a record".to_string());
    };
    let fields = record
        .fields
        .iter()
        .map(|field| {
            let json = event.get(&field.name).unwrap_or(&serde_json::Value::Null);
            avro_value(json, &field.schema)
                .map(|value| (field.name.clone(), value))
                .map_err(|e| format!("{}: {e}", field.name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|writer| writer.write_value_to_vec(AvroValue::Record(fields)))
        .map_err(|e| e.to_string())
}

/// A JSON value as an Avro value of `schema`.
fn avro_value(json: &serde_json::Value, schema: &AvroSchema) -> Result<AvroValue, String> {
    use serde_json::Value as Json;
    let text = || match json {
        Json::String(text) => Ok(text.clone()),
        Json::Number(number) => Ok(number.to_string()),
        other => Err(format!("expected text, found {other}")),
    };
    Ok(match schema {
        AvroSchema::Union(union) => {
            let variants = union.variants();
            if json.is_null()
                && let Some(at) = variants.iter().position(|v| matches!(v, AvroSchema::Null))
            {
                return Ok(AvroValue::Union(at as u32, Box::new(AvroValue::Null)));
            }
            let (at, value) = variants
                .iter()
                .enumerate()
                .filter(|(_, v)| !matches!(v, AvroSchema::Null))
                .find_map(|(at, variant)| avro_value(json, variant).ok().map(|value| (at, value)))
                .ok_or_else(|| format!("{json} fits no branch of its union"))?;
            AvroValue::Union(at as u32, Box::new(value))
        }
        AvroSchema::Null if json.is_null() => AvroValue::Null,
        AvroSchema::String => AvroValue::String(text()?),
        AvroSchema::Uuid(_) => {
            let text = text()?;
            AvroValue::Uuid(uuid::Uuid::parse_str(&text).map_err(|e| format!("{text:?} is not a UUID: {e}"))?)
        }
        AvroSchema::Boolean => AvroValue::Boolean(json.as_bool().ok_or("expected a boolean")?),
        AvroSchema::Int => AvroValue::Int(json.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or("expected an int")?),
        AvroSchema::Long => AvroValue::Long(json.as_i64().ok_or("expected a long")?),
        AvroSchema::Double => AvroValue::Double(json.as_f64().ok_or("expected a number")?),
        AvroSchema::Float => AvroValue::Float(json.as_f64().ok_or("expected a number")? as f32),
        AvroSchema::Enum(enumeration) => {
            let text = text()?;
            let at = enumeration
                .symbols
                .iter()
                .position(|symbol| symbol.eq_ignore_ascii_case(&text))
                .ok_or_else(|| format!("{text:?} is none of {:?}", enumeration.symbols))?;
            AvroValue::Enum(at as u32, enumeration.symbols[at].clone())
        }
        AvroSchema::Decimal(decimal) => {
            let unscaled = unscaled_decimal(&text()?, decimal.scale)?;
            AvroValue::Decimal(apache_avro::Decimal::from(minimal_twos_complement(unscaled)))
        }
        AvroSchema::TimestampMicros | AvroSchema::LocalTimestampMicros => {
            AvroValue::TimestampMicros(crate::domain::timestamp::parse_timestamp(&text()?)?.timestamp_micros())
        }
        AvroSchema::TimestampMillis | AvroSchema::LocalTimestampMillis => {
            AvroValue::TimestampMillis(crate::domain::timestamp::parse_timestamp(&text()?)?.timestamp_millis())
        }
        other => return Err(format!("a field of Avro type {other:?} is not written")),
    })
}

/// Decimal text (`-952.4`, `10`) as its unscaled integer at `scale`.
fn unscaled_decimal(text: &str, scale: usize) -> Result<i128, String> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if fraction.len() > scale || whole.is_empty() && fraction.is_empty() {
        return Err(format!("{text:?} is not a decimal of scale {scale}"));
    }
    let all = format!("{whole}{fraction:0<scale$}");
    let unscaled: i128 = all.parse().map_err(|_| format!("{text:?} is not a decimal"))?;
    Ok(if negative { -unscaled } else { unscaled })
}

/// The shortest big-endian two's-complement bytes of `n`.
fn minimal_twos_complement(n: i128) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let sign = if n < 0 { 0xff } else { 0 };
    let mut start = 0;
    while start < bytes.len() - 1 && bytes[start] == sign && (bytes[start + 1] & 0x80) == (sign & 0x80) {
        start += 1;
    }
    bytes[start..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_read_exactly_at_their_scale() {
        let text = |bytes: &[u8], scale| match decimal_text(bytes, scale) {
            RawField::Text(text) => text,
            other => panic!("{other:?}"),
        };
        assert_eq!(text(&[0x01, 0x00], 2), "2.56");
        assert_eq!(text(&[0xff, 0x00], 2), "-2.56");
        assert_eq!(text(&[0x05], 2), "0.05");
        assert_eq!(text(&[0xfb], 2), "-0.05");
        assert_eq!(text(&[], 2), "0.00");
        assert_eq!(text(&[0x30, 0x39], 0), "12345");
        // 999,999,999,999 cents, the largest amount of NUMERIC(12,2).
        assert_eq!(text(&999_999_999_999i64.to_be_bytes(), 2), "9999999999.99");
        assert_eq!(text(&[1; 17], 2), "a decimal of 17 bytes");
    }

    #[test]
    fn decimal_text_round_trips_through_its_bytes() {
        for (text, scale, back) in [
            ("-952.4", 2, "-952.40"),
            ("10", 2, "10.00"),
            ("0.05", 2, "0.05"),
            ("-0.05", 2, "-0.05"),
            ("9999999999.99", 2, "9999999999.99"),
            ("-128", 0, "-128"),
            ("127", 0, "127"),
            ("128", 0, "128"),
        ] {
            let bytes = minimal_twos_complement(unscaled_decimal(text, scale).unwrap());
            assert_eq!(decimal_text(&bytes, scale), RawField::Text(back.to_string()), "{text}");
        }
        assert_eq!(minimal_twos_complement(-128), [0x80]);
        assert_eq!(minimal_twos_complement(128), [0x00, 0x80]);
        assert!(unscaled_decimal("1.234", 2).is_err());
        assert!(unscaled_decimal("1e5", 2).is_err());
    }
}
