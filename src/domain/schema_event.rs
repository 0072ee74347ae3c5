//! Events written with a schema from a registry (Avro, Protobuf, JSON
//! Schema) read into the same [`RawTransaction`] as plain JSON, so that
//! they meet the same validation and get the same transaction and id.
//!
//! Fields are matched by name, as Avro's schema resolution matches them: a
//! field the writer added (a schema's next version) is ignored, and one it
//! lacks is `missing`, named by validation. So a writer's schema is never
//! resolved against a fixed reader's schema: txnflow's validation rules
//! are the reader's schema, for every format. Values keep their kind:
//! text stays text, numbers stay numbers, a decimal becomes its exact text.

use std::io::Cursor;

use apache_avro::Schema as AvroSchema;
use apache_avro::types::Value as AvroValue;
use protox::prost_reflect::{self, DynamicMessage, FileDescriptor, Kind, MessageDescriptor, ReflectMessage};

use super::event::{RecordError, RejectStage, decode_event};
use super::validation::{RawField, RawTransaction};
use super::wire_format::{Framing, FramingError, framing, message_indexes};

/// The schema formats a registry holds, by its `schemaType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaFormat {
    Avro,
    Protobuf,
    JsonSchema,
}

impl SchemaFormat {
    /// From a registry's `schemaType` (absent means Avro).
    pub fn from_schema_type(schema_type: Option<&str>) -> Option<SchemaFormat> {
        match schema_type {
            None | Some("AVRO") => Some(SchemaFormat::Avro),
            Some("PROTOBUF") => Some(SchemaFormat::Protobuf),
            Some("JSON") => Some(SchemaFormat::JsonSchema),
            Some(_) => None,
        }
    }

    /// The `schemaType` a registry is given for it.
    pub fn schema_type(self) -> &'static str {
        match self {
            SchemaFormat::Avro => "AVRO",
            SchemaFormat::Protobuf => "PROTOBUF",
            SchemaFormat::JsonSchema => "JSON",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SchemaFormat::Avro => "avro",
            SchemaFormat::Protobuf => "protobuf",
            SchemaFormat::JsonSchema => "json_schema",
        }
    }
}

/// How `kafka.value_format` reads a record's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// Plain JSON only; framed bytes are invalid JSON.
    Json,
    /// Framed for the registry, each with its own schema's format.
    Avro,
    Protobuf,
    JsonSchema,
    /// Framed records by their schema, plain JSON otherwise.
    Auto,
}

impl ValueFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueFormat::Json => "json",
            ValueFormat::Avro => "avro",
            ValueFormat::Protobuf => "protobuf",
            ValueFormat::JsonSchema => "json_schema",
            ValueFormat::Auto => "auto",
        }
    }
}

/// What a registry says of a schema id.
#[derive(Debug, Clone)]
pub enum SchemaLookup {
    Found(std::sync::Arc<EventSchema>),
    /// The registry does not know the id.
    NotFound,
    /// A schema txnflow cannot read, with why.
    Unusable(String),
    /// No registry is configured.
    NoRegistry,
}

/// Reads a record's value as `format` says, with `lookup` giving the
/// schema of a framed one (already fetched: see the reader). The schema
/// id a dead letter names is read again from its value's framing.
pub fn read_value(
    payload: &[u8],
    format: ValueFormat,
    require_schema: bool,
    lookup: impl FnOnce(u32) -> SchemaLookup,
) -> Result<RawTransaction, RecordError> {
    let framing = if format == ValueFormat::Json { Ok(Framing::Unframed(payload)) } else { framing(payload) };
    match framing {
        Err(error) => Err(decode_error(error.to_string())),
        Ok(Framing::Unframed(json)) => {
            if require_schema {
                Err(decode_error("no schema: the record is not framed for the schema registry".to_string()))
            } else if !matches!(format, ValueFormat::Json | ValueFormat::Auto) {
                Err(decode_error(format!(
                    "no schema: kafka.value_format is {} and the record is not framed for the schema registry",
                    format.as_str()
                )))
            } else {
                decode_event(json)
            }
        }
        Ok(Framing::Framed { schema_id, body }) => match lookup(schema_id) {
            SchemaLookup::Found(schema) => {
                let wanted = match format {
                    ValueFormat::Avro => Some(SchemaFormat::Avro),
                    ValueFormat::Protobuf => Some(SchemaFormat::Protobuf),
                    ValueFormat::JsonSchema => Some(SchemaFormat::JsonSchema),
                    ValueFormat::Json | ValueFormat::Auto => None,
                };
                match wanted {
                    Some(wanted) if wanted != schema.format() => Err(decode_error(format!(
                        "schema id {schema_id} is {}, and kafka.value_format is {}",
                        schema.format().as_str(),
                        format.as_str()
                    ))),
                    _ => schema.decode(body),
                }
            }
            SchemaLookup::NotFound => Err(decode_error(format!("schema id {schema_id} not found in the registry"))),
            SchemaLookup::Unusable(why) => Err(decode_error(format!("schema id {schema_id} is unusable: {why}"))),
            SchemaLookup::NoRegistry => {
                Err(decode_error(format!("framed for schema id {schema_id}, and no schema_registry.url is set")))
            }
        },
    }
}

/// The repository's schemas (`schemas/`), as `txnflow setup` and
/// `txnflow produce` register them.
pub const TRANSACTION_AVRO: &str = include_str!("../../schemas/transaction.avsc");
pub const TRANSACTION_PROTOBUF: &str = include_str!("../../schemas/transaction.proto");
pub const TRANSACTION_JSON_SCHEMA: &str = include_str!("../../schemas/transaction.schema.json");
pub const PREDICTION_AVRO: &str = include_str!("../../schemas/prediction.avsc");

/// The repository's transaction schema in `format`.
pub fn transaction_schema_text(format: SchemaFormat) -> &'static str {
    match format {
        SchemaFormat::Avro => TRANSACTION_AVRO,
        SchemaFormat::Protobuf => TRANSACTION_PROTOBUF,
        SchemaFormat::JsonSchema => TRANSACTION_JSON_SCHEMA,
    }
}

/// A writer's schema, parsed once and kept.
#[derive(Debug, Clone)]
pub enum EventSchema {
    Avro(AvroSchema),
    /// The `.proto` file the schema is, compiled.
    Protobuf(FileDescriptor),
    /// JSON Schema: the body is JSON, read as a plain event.
    JsonSchema,
}

/// The name the registry's `.proto` text is compiled under.
const PROTO_FILE: &str = "registry.proto";

impl EventSchema {
    /// Parses a registry's schema text. Protobuf imports of Google's
    /// well-known types resolve; imports of other subjects (schema
    /// references) are not read, and such a schema is refused.
    pub fn parse(format: SchemaFormat, text: &str) -> Result<EventSchema, String> {
        match format {
            SchemaFormat::Avro => {
                AvroSchema::parse_str(text).map(EventSchema::Avro).map_err(|e| format!("an Avro schema: {e}"))
            }
            SchemaFormat::Protobuf => {
                let mut files = protox::file::ChainFileResolver::new();
                files.add(RegistryProto(text.to_string()));
                files.add(protox::file::GoogleFileResolver::new());
                let mut compiler = protox::Compiler::with_file_resolver(files);
                compiler.open_file(PROTO_FILE).map_err(|e| format!("a Protobuf schema: {e}"))?;
                let pool = compiler.descriptor_pool();
                pool.get_file_by_name(PROTO_FILE)
                    .map(EventSchema::Protobuf)
                    .ok_or_else(|| "a Protobuf schema: no file compiled".to_string())
            }
            SchemaFormat::JsonSchema => serde_json::from_str::<serde_json::Value>(text)
                .map(|_| EventSchema::JsonSchema)
                .map_err(|e| format!("a JSON Schema: {e}")),
        }
    }

    pub fn format(&self) -> SchemaFormat {
        match self {
            EventSchema::Avro(_) => SchemaFormat::Avro,
            EventSchema::Protobuf(_) => SchemaFormat::Protobuf,
            EventSchema::JsonSchema => SchemaFormat::JsonSchema,
        }
    }

    /// Decodes a framed record's body (after the 5-byte header).
    pub fn decode(&self, body: &[u8]) -> Result<RawTransaction, RecordError> {
        match self {
            EventSchema::Avro(schema) => decode_avro(schema, body),
            EventSchema::Protobuf(file) => decode_protobuf(file, body),
            EventSchema::JsonSchema => decode_event(body),
        }
    }
}

/// The registry's schema as the one file the compiler may open: `.proto`
/// text, or a base64 `FileDescriptorProto`, as Confluent's serializers
/// register it (a registry may give back either).
struct RegistryProto(String);

impl protox::file::FileResolver for RegistryProto {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name != PROTO_FILE {
            return Err(protox::Error::file_not_found(name));
        }
        match descriptor_of(&self.0) {
            Some(mut descriptor) => {
                descriptor.name = Some(PROTO_FILE.to_string());
                Ok(protox::file::File::from_file_descriptor_proto(descriptor))
            }
            None => protox::file::File::from_source(name, &self.0),
        }
    }
}

/// A base64 `FileDescriptorProto`, when the text is one.
fn descriptor_of(text: &str) -> Option<protox::prost_reflect::prost_types::FileDescriptorProto> {
    use base64::Engine;
    use protox::prost::Message;
    let text = text.trim();
    if text.is_empty() || text.contains(char::is_whitespace) {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    protox::prost_reflect::prost_types::FileDescriptorProto::decode(bytes.as_slice()).ok()
}

fn decode_error(message: String) -> RecordError {
    RecordError { stage: RejectStage::Decode, message }
}

fn decode_avro(schema: &AvroSchema, body: &[u8]) -> Result<RawTransaction, RecordError> {
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

/// A finite float as a JSON number; anything else as its text, which
/// validation refuses with the value's kind.
fn float_field(x: f64) -> RawField {
    serde_json::Number::from_f64(x).map_or_else(|| RawField::Text(x.to_string()), RawField::Number)
}

fn timestamp_field(at: Option<chrono::DateTime<chrono::Utc>>) -> RawField {
    match at {
        Some(at) => RawField::Text(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        None => RawField::Text("out of range".to_string()),
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

fn decode_protobuf(file: &FileDescriptor, body: &[u8]) -> Result<RawTransaction, RecordError> {
    let (indexes, message) = message_indexes(body).map_err(|e: FramingError| decode_error(e.to_string()))?;
    let descriptor = message_at(file, &indexes)
        .ok_or_else(|| decode_error(format!("no message at indexes {indexes:?} in the Protobuf schema")))?;
    let decoded = DynamicMessage::decode(descriptor.clone(), message)
        .map_err(|e| decode_error(format!("not a Protobuf {} message: {e}", descriptor.full_name())))?;
    Ok(RawTransaction::from_fields(|name| match descriptor.get_field_by_name(name) {
        None => RawField::Missing,
        Some(field) if field.supports_presence() && !decoded.has_field(&field) => RawField::Missing,
        Some(field) => protobuf_field(&decoded.get_field(&field), &field.kind()),
    }))
}

/// The message type at `indexes`: the first picks a message of the file,
/// each next one a message nested in it.
fn message_at(file: &FileDescriptor, indexes: &[i32]) -> Option<MessageDescriptor> {
    let (first, nested) = indexes.split_first()?;
    let mut message = file.messages().nth(usize::try_from(*first).ok()?)?;
    for index in nested {
        let child = message.child_messages().nth(usize::try_from(*index).ok()?)?;
        message = child;
    }
    Some(message)
}

fn protobuf_field(value: &prost_reflect::Value, kind: &Kind) -> RawField {
    use prost_reflect::Value;
    match value {
        Value::Bool(flag) => RawField::Bool(*flag),
        Value::I32(n) => RawField::Number((*n).into()),
        Value::I64(n) => RawField::Number((*n).into()),
        Value::U32(n) => RawField::Number((*n).into()),
        Value::U64(n) => RawField::Number((*n).into()),
        Value::F32(x) => float_field(f64::from(*x)),
        Value::F64(x) => float_field(*x),
        Value::String(text) => RawField::Text(text.clone()),
        // The value 0 of an enum is its "not set"; another value is its
        // name, lowercase (`DEBIT` is `debit`).
        Value::EnumNumber(0) => RawField::Missing,
        Value::EnumNumber(number) => match kind {
            Kind::Enum(enumeration) => enumeration
                .get_value(*number)
                .map_or_else(|| RawField::Text(number.to_string()), |v| RawField::Text(v.name().to_lowercase())),
            _ => RawField::Text(number.to_string()),
        },
        Value::Message(message) if message.descriptor().full_name() == "google.protobuf.Timestamp" => {
            let seconds = message.get_field_by_name("seconds").and_then(|v| v.as_i64()).unwrap_or_default();
            let nanos = message.get_field_by_name("nanos").and_then(|v| v.as_i32()).unwrap_or_default();
            timestamp_field(chrono::DateTime::from_timestamp(seconds, nanos.max(0) as u32))
        }
        Value::Bytes(_) | Value::Message(_) | Value::List(_) | Value::Map(_) => RawField::Composite,
    }
}

impl EventSchema {
    /// Encodes a JSON event (an object with the event's fields) with this
    /// schema: the body of a framed record, after the 5-byte header (for
    /// Protobuf, the message indexes included). For producers and tests.
    pub fn encode(&self, event: &serde_json::Value) -> Result<Vec<u8>, String> {
        match self {
            EventSchema::Avro(schema) => encode_avro(schema, event),
            EventSchema::Protobuf(file) => encode_protobuf(file, event),
            EventSchema::JsonSchema => Ok(event.to_string().into_bytes()),
        }
    }
}

impl EventSchema {
    /// A JSON event as a record value framed for schema `id`.
    pub fn frame(&self, id: u32, event: &serde_json::Value) -> Result<Vec<u8>, String> {
        // A Protobuf body begins with its message indexes already.
        Ok([super::wire_format::frame(id, &[]), self.encode(event)?].concat())
    }
}

fn encode_avro(schema: &AvroSchema, event: &serde_json::Value) -> Result<Vec<u8>, String> {
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
            AvroValue::TimestampMicros(super::timestamp::parse_timestamp(&text()?)?.timestamp_micros())
        }
        AvroSchema::TimestampMillis | AvroSchema::LocalTimestampMillis => {
            AvroValue::TimestampMillis(super::timestamp::parse_timestamp(&text()?)?.timestamp_millis())
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

fn encode_protobuf(file: &FileDescriptor, event: &serde_json::Value) -> Result<Vec<u8>, String> {
    use prost_reflect::Value;
    use protox::prost::Message;
    let descriptor = file.messages().next().ok_or("the Protobuf schema has no message")?;
    let mut message = DynamicMessage::new(descriptor.clone());
    for field in descriptor.fields() {
        let json = match event.get(field.name()) {
            None | Some(serde_json::Value::Null) => continue,
            Some(json) => json,
        };
        let value = match (field.kind(), json) {
            (Kind::String, serde_json::Value::String(text)) => Value::String(text.clone()),
            (Kind::String, serde_json::Value::Number(number)) => Value::String(number.to_string()),
            (Kind::Double, json) => {
                Value::F64(json.as_f64().ok_or_else(|| format!("{}: expected a number", field.name()))?)
            }
            (Kind::Int64, json) => {
                Value::I64(json.as_i64().ok_or_else(|| format!("{}: expected an integer", field.name()))?)
            }
            (Kind::Bool, json) => {
                Value::Bool(json.as_bool().ok_or_else(|| format!("{}: expected a boolean", field.name()))?)
            }
            (Kind::Enum(enumeration), serde_json::Value::String(text)) => {
                let value = enumeration
                    .values()
                    .find(|value| value.name().eq_ignore_ascii_case(text))
                    .ok_or_else(|| format!("{}: {text:?} is none of its values", field.name()))?;
                Value::EnumNumber(value.number())
            }
            (kind, json) => return Err(format!("{}: {json} as {kind:?} is not written", field.name())),
        };
        message.try_set_field(&field, value).map_err(|e| format!("{}: {e}", field.name()))?;
    }
    let mut body = vec![0];
    message.encode(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
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

    fn seed_event() -> serde_json::Value {
        serde_json::json!({
            "id": "42", "description": "Paiement carte", "amount": -952.4,
            "timestamp": "2023-11-28T05:35:12.123456Z", "merchant": null,
            "operation_type": "card", "side": "debit", "run_id": "r1"
        })
    }

    #[test]
    fn the_repos_schemas_write_and_read_the_same_transaction_as_json() {
        let json = decode_event(seed_event().to_string().as_bytes()).unwrap();
        let avro = EventSchema::parse(SchemaFormat::Avro, TRANSACTION_AVRO).unwrap();
        let proto = EventSchema::parse(SchemaFormat::Protobuf, TRANSACTION_PROTOBUF).unwrap();
        let json_schema = EventSchema::parse(SchemaFormat::JsonSchema, TRANSACTION_JSON_SCHEMA).unwrap();
        let validated = |raw: &RawTransaction| crate::domain::validation::validate(raw).unwrap();
        for schema in [avro, proto, json_schema] {
            let body = schema.encode(&seed_event()).unwrap();
            let raw = schema.decode(&body).unwrap();
            assert_eq!(validated(&raw), validated(&json), "{:?}", schema.format());
        }
    }

    #[test]
    fn a_field_the_schema_lacks_is_named_missing_and_an_added_one_is_ignored() {
        let without_side = r#"{"type":"record","name":"T","fields":[
            {"name":"id","type":"string"},{"name":"description","type":"string"},
            {"name":"amount","type":"double"},{"name":"timestamp","type":"string"},
            {"name":"operation_type","type":"string"},{"name":"loyalty","type":"int"}]}"#;
        let schema = EventSchema::parse(SchemaFormat::Avro, without_side).unwrap();
        let mut event = seed_event();
        event["loyalty"] = 3.into();
        let raw = schema.decode(&schema.encode(&event).unwrap()).unwrap();
        let refused = crate::domain::validation::validate(&raw).unwrap_err();
        assert_eq!(refused.fields(), ["side"], "{refused}");
        assert_eq!(raw.amount, RawField::Number(serde_json::Number::from_f64(-952.4).unwrap()));
        assert_eq!(raw.merchant, RawField::Missing);
    }

    #[test]
    fn a_protobuf_schema_registered_as_a_base64_descriptor_reads_as_its_text() {
        use base64::Engine;
        use protox::prost::Message;
        let EventSchema::Protobuf(file) = EventSchema::parse(SchemaFormat::Protobuf, TRANSACTION_PROTOBUF).unwrap()
        else {
            panic!("protobuf")
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(file.file_descriptor_proto().encode_to_vec());
        let from_descriptor = EventSchema::parse(SchemaFormat::Protobuf, &encoded).unwrap();
        let from_text = EventSchema::parse(SchemaFormat::Protobuf, TRANSACTION_PROTOBUF).unwrap();
        let body = from_text.encode(&seed_event()).unwrap();
        assert_eq!(from_descriptor.decode(&body).unwrap(), from_text.decode(&body).unwrap());
    }

    #[test]
    fn corrupt_bodies_are_refused_without_panic() {
        let avro = EventSchema::parse(SchemaFormat::Avro, TRANSACTION_AVRO).unwrap();
        let proto = EventSchema::parse(SchemaFormat::Protobuf, TRANSACTION_PROTOBUF).unwrap();
        for schema in [&avro, &proto] {
            let body = schema.encode(&seed_event()).unwrap();
            for cut in 0..body.len() {
                let _ = schema.decode(&body[..cut]);
            }
            let mut noisy = body.clone();
            noisy.extend_from_slice(&[0xff; 8]);
            assert!(schema.decode(&noisy).is_err(), "{:?}: trailing bytes", schema.format());
        }
        assert!(avro.decode(&[0x02, 0x41]).unwrap_err().message.starts_with("not an Avro record of its schema"));
    }
}
