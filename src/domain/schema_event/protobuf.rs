//! Protobuf bodies: the registry's schema compiled (from `.proto` text or
//! a base64 descriptor), a message read into raw fields by name, and
//! written from a JSON event.

use protox::prost_reflect::{self, DynamicMessage, FileDescriptor, Kind, MessageDescriptor, ReflectMessage};

use super::{PROTO_FILE, decode_error, float_field, timestamp_field};
use crate::domain::event::RecordError;
use crate::domain::validation::{RawField, RawTransaction};
use crate::domain::wire_format::{FramingError, message_indexes};

/// The registry's schema as the one file the compiler may open: `.proto`
/// text, or a base64 `FileDescriptorProto`, as Confluent's serializers
/// register it (a registry may give back either).
pub(super) struct RegistryProto(pub(super) String);

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

pub(super) fn decode_protobuf(file: &FileDescriptor, body: &[u8]) -> Result<RawTransaction, RecordError> {
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

pub(super) fn encode_protobuf(file: &FileDescriptor, event: &serde_json::Value) -> Result<Vec<u8>, String> {
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
