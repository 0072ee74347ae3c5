//! The schema registry client: a Confluent-compatible API (Confluent,
//! Apicurio's `ccompat`, Redpanda, Karapace), reached over HTTP.
//!
//! Schemas are fetched by id once and kept, at most
//! `schema_registry.max_cached_schemas` of them (the oldest goes first). A
//! registry that cannot answer (unreachable, 5xx, a timeout, refusing
//! txnflow's credentials) is [`Unavailable`]: never the record's fault,
//! so the reader waits for it. An id the registry does not know is the
//! record's fault ([`Lookup::NotFound`]), as is a schema txnflow cannot use.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::SchemaRegistryConfig;
pub use crate::domain::schema_event::SchemaLookup as Lookup;
use crate::domain::schema_event::{EventSchema, SchemaFormat};

/// The registry could not answer; the reason names no secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the schema registry at schema_registry.url cannot answer: {0}")]
pub struct Unavailable(pub String);

/// Error bodies read at most: enough for the registry's message.
const ERROR_BODY_BYTES: usize = 1024;
/// A schema's text read at most.
const SCHEMA_BYTES: usize = 1024 * 1024;
/// Any other answer (registration, compatibility) read at most.
const ANSWER_BYTES: usize = 64 * 1024;
/// Tries of a registration or configuration request that got no answer.
const SEND_ATTEMPTS: u32 = 3;

enum Credentials {
    None,
    Basic { username: String, password: String },
    Bearer(String),
}

/// The schemas fetched, by id, at most `max` of them.
struct SchemaCache {
    schemas: HashMap<u32, Lookup>,
    order: VecDeque<u32>,
    max: usize,
}

impl SchemaCache {
    fn insert(&mut self, id: u32, lookup: Lookup) {
        if self.schemas.insert(id, lookup).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.max {
            if let Some(oldest) = self.order.pop_front() {
                self.schemas.remove(&oldest);
            }
        }
    }
}

pub struct SchemaRegistry {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
    cache: Mutex<SchemaCache>,
}

impl SchemaRegistry {
    /// The client of the configured registry, or None without a URL.
    pub fn new(config: &SchemaRegistryConfig) -> anyhow::Result<Option<SchemaRegistry>> {
        if config.url.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut builder =
            reqwest::Client::builder().timeout(timeout).connect_timeout(timeout.min(Duration::from_secs(5)));
        if !config.ca_file.is_empty() {
            let pem = std::fs::read(&config.ca_file)
                .map_err(|e| anyhow::anyhow!("schema_registry.ca_file: cannot read {}: {e}", config.ca_file))?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("schema_registry.ca_file: not a PEM certificate: {e}"))?;
            builder = builder.add_root_certificate(certificate);
        }
        let credentials = if !config.token.is_empty() {
            Credentials::Bearer(config.token.clone())
        } else if !config.username.is_empty() {
            Credentials::Basic { username: config.username.clone(), password: config.password.clone() }
        } else {
            Credentials::None
        };
        Ok(Some(SchemaRegistry {
            http: builder.build()?,
            base: config.url.trim_end_matches('/').to_string(),
            credentials,
            cache: Mutex::new(SchemaCache {
                schemas: HashMap::new(),
                order: VecDeque::new(),
                max: config.max_cached_schemas,
            }),
        }))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, SchemaCache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What is known of `id` without asking the registry.
    pub fn cached(&self, id: u32) -> Option<Lookup> {
        self.cache().schemas.get(&id).cloned()
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("accept", "application/vnd.schemaregistry.v1+json, application/json");
        match &self.credentials {
            Credentials::None => request,
            Credentials::Basic { username, password } => request.basic_auth(username, Some(password)),
            Credentials::Bearer(token) => request.bearer_auth(token),
        }
    }

    /// Fetches schema `id` (once: the answer is kept).
    pub async fn fetch(&self, id: u32) -> Result<Lookup, Unavailable> {
        if let Some(known) = self.cached(id) {
            return Ok(known);
        }
        let response = self
            .request(reqwest::Method::GET, &format!("/schemas/ids/{id}"))
            .send()
            .await
            .map_err(|e| Unavailable(described(e)))?;
        let status = response.status();
        let lookup = if status == reqwest::StatusCode::NOT_FOUND {
            Lookup::NotFound
        } else if status.is_success() {
            let body = read_bounded(response, SCHEMA_BYTES).await?;
            parse_schema(&body)
        } else {
            let body = read_bounded(response, ERROR_BODY_BYTES).await.unwrap_or_default();
            let detail = crate::domain::dead_letter::sanitized_reason(&String::from_utf8_lossy(&body));
            return Err(Unavailable(format!("GET /schemas/ids/{id} answered {status}: {detail}")));
        };
        self.cache().insert(id, lookup.clone());
        Ok(lookup)
    }

    /// Registers `text` under `subject` (or finds it registered) and gives
    /// its id.
    pub async fn register(&self, subject: &str, format: SchemaFormat, text: &str) -> anyhow::Result<u32> {
        let mut body = serde_json::json!({"schema": text});
        if format != SchemaFormat::Avro {
            body["schemaType"] = format.schema_type().into();
        }
        let answer = self.send_json(reqwest::Method::POST, &format!("/subjects/{subject}/versions"), &body).await?;
        answer["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| anyhow::anyhow!("the registry's answer to registering {subject} has no id"))
    }

    /// The subjects the registry holds.
    pub async fn subjects(&self) -> anyhow::Result<Vec<String>> {
        let response = self
            .request(reqwest::Method::GET, "/subjects")
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("GET /subjects: {}", described(e)))?;
        let status = response.status();
        let body = read_bounded(response, SCHEMA_BYTES).await?;
        if !status.is_success() {
            let detail = crate::domain::dead_letter::sanitized_reason(&String::from_utf8_lossy(&body));
            anyhow::bail!("GET /subjects answered {status}: {detail}");
        }
        serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("GET /subjects: {e}"))
    }

    /// Sets `subject`'s compatibility level, such as `BACKWARD`.
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({"compatibility": level});
        self.send_json(reqwest::Method::PUT, &format!("/config/{subject}"), &body).await.map(|_| ())
    }

    async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        // Registration and configuration are idempotent, so a request that
        // never reached the registry (refused, reset) is sent again, at most
        // SEND_ATTEMPTS times; an answer, whatever it says, is final.
        let mut attempt = 1;
        let response = loop {
            let sent = self
                .request(method.clone(), path)
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string())
                .send()
                .await;
            match sent {
                Ok(response) => break response,
                Err(error) if attempt < SEND_ATTEMPTS && (error.is_connect() || error.is_request()) => {
                    tracing::debug!(error = described(error), attempt, "the schema registry: sending again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(error) => anyhow::bail!("the schema registry: {method} {path}: {}", described(error)),
            }
        };
        let status = response.status();
        let text = read_bounded(response, ANSWER_BYTES).await.map_err(|e| anyhow::anyhow!(e))?;
        let text = String::from_utf8_lossy(&text);
        if !status.is_success() {
            let detail = crate::domain::dead_letter::sanitized_reason(&text);
            anyhow::bail!("the schema registry answered {method} {path} with {status}: {detail}");
        }
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("the schema registry's answer to {path}: {e}"))
    }
}

/// `txnflow setup`: registers the transaction's Avro schema for
/// `kafka.topic` and the predictions' for `kafka.predictions_topic` (when
/// set), each under `<topic>-value` with `BACKWARD` compatibility, so that
/// a later version must still read what was written before.
pub async fn register_pipeline_schemas(config: &crate::config::Config) -> anyhow::Result<()> {
    use crate::domain::schema_event::{PREDICTION_AVRO, TRANSACTION_AVRO};
    let Some(registry) = SchemaRegistry::new(&config.schema_registry)? else {
        println!("schema registry: none (schema_registry.url is empty)");
        return Ok(());
    };
    let kafka = &config.kafka;
    let mut subjects = vec![(format!("{}-value", kafka.topic), TRANSACTION_AVRO)];
    if !kafka.predictions_topic.is_empty() {
        subjects.push((format!("{}-value", kafka.predictions_topic), PREDICTION_AVRO));
    }
    for (subject, text) in subjects {
        let id = registry.register(&subject, SchemaFormat::Avro, text).await?;
        registry.set_compatibility(&subject, "BACKWARD").await?;
        println!("schema registered: {subject} (id {id}, Avro, compatibility BACKWARD)");
    }
    Ok(())
}

/// A `GET /schemas/ids/{id}` answer: `{"schema", "schemaType"?, "references"?}`.
fn parse_schema(body: &[u8]) -> Lookup {
    #[derive(serde::Deserialize)]
    struct Answer {
        schema: String,
        #[serde(rename = "schemaType")]
        schema_type: Option<String>,
        #[serde(default)]
        references: Vec<serde_json::Value>,
    }
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(e) => return Lookup::Unusable(format!("the registry's answer is not a schema: {e}")),
    };
    if !answer.references.is_empty() {
        return Lookup::Unusable("a schema with references to other subjects, which txnflow does not read".into());
    }
    let Some(format) = SchemaFormat::from_schema_type(answer.schema_type.as_deref()) else {
        return Lookup::Unusable(format!("a schema of type {:?}", answer.schema_type.unwrap_or_default()));
    };
    match EventSchema::parse(format, &answer.schema) {
        Ok(schema) => Lookup::Found(Arc::new(schema)),
        Err(why) => Lookup::Unusable(why),
    }
}

/// The body, or Unavailable past `max` bytes.
async fn read_bounded(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, Unavailable> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| Unavailable(described(e)))? {
        if body.len() + chunk.len() > max {
            return Err(Unavailable(format!("an answer over {max} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A request's failure with its causes (refused, reset, a TLS error), and
/// without its URL, which may carry credentials.
fn described(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_newest_schemas() {
        let mut cache = SchemaCache { schemas: HashMap::new(), order: VecDeque::new(), max: 2 };
        for id in [1, 2, 3] {
            cache.insert(id, Lookup::NotFound);
        }
        let mut kept: Vec<u32> = cache.schemas.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, [2, 3]);
        cache.insert(3, Lookup::NotFound);
        assert_eq!(cache.order, [2, 3], "an id kept again is not counted twice");
    }

    #[test]
    fn a_registry_answer_is_parsed_by_its_type() {
        let avro =
            br#"{"schema": "{\"type\":\"record\",\"name\":\"T\",\"fields\":[{\"name\":\"id\",\"type\":\"string\"}]}"}"#;
        assert!(matches!(parse_schema(avro), Lookup::Found(schema) if schema.format() == SchemaFormat::Avro));
        let proto = br#"{"schema": "syntax = \"proto3\"; message T { string id = 1; }", "schemaType": "PROTOBUF"}"#;
        assert!(matches!(parse_schema(proto), Lookup::Found(schema) if schema.format() == SchemaFormat::Protobuf));
        let json = br#"{"schema": "{\"type\":\"object\"}", "schemaType": "JSON"}"#;
        assert!(matches!(parse_schema(json), Lookup::Found(schema) if schema.format() == SchemaFormat::JsonSchema));
        assert!(matches!(parse_schema(br#"{"schema": "nope"}"#), Lookup::Unusable(_)));
        assert!(matches!(parse_schema(br#"{"schema": "x", "schemaType": "XML"}"#), Lookup::Unusable(_)));
        let referencing = br#"{"schema": "{}", "references": [{"name": "a", "subject": "b", "version": 1}]}"#;
        assert!(matches!(parse_schema(referencing), Lookup::Unusable(why) if why.contains("references")));
    }
}
