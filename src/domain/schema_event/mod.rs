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
//!
//! Each format's reading and writing is in its own file: [`avro`] and
//! [`protobuf`]; a JSON Schema body is JSON.

use apache_avro::Schema as AvroSchema;
use protox::prost_reflect::FileDescriptor;

use super::event::{RecordError, RejectStage, decode_event};
use super::validation::{RawField, RawTransaction};
use super::wire_format::{Framing, framing};

mod avro;
mod protobuf;

use avro::{decode_avro, encode_avro};
use protobuf::{RegistryProto, decode_protobuf, encode_protobuf};

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
pub const TRANSACTION_AVRO: &str = include_str!("../../../schemas/transaction.avsc");
pub const TRANSACTION_PROTOBUF: &str = include_str!("../../../schemas/transaction.proto");
pub const TRANSACTION_JSON_SCHEMA: &str = include_str!("../../../schemas/transaction.schema.json");
pub const PREDICTION_AVRO: &str = include_str!("../../../schemas/prediction.avsc");

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

fn decode_error(message: String) -> RecordError {
    RecordError { stage: RejectStage::Decode, message }
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

#[cfg(test)]
mod tests {
    use super::*;

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
