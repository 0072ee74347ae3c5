//! Events framed for a schema registry, against the local stack's
//! registry (Apicurio, Confluent-compatible API): Avro, Protobuf and JSON
//! Schema records read as plain JSON ones are, on one topic.

use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

use crate::helpers::assert_same_set;
use crate::scenario::{Scenario, ids_of, valid_events};
use txnflow::domain::categories::reference_category;
use txnflow::domain::schema_event::{EventSchema, SchemaFormat, TRANSACTION_AVRO, transaction_schema_text};
use txnflow::domain::wire_format;
use txnflow::kafka::schema_registry::SchemaRegistry;

/// The local stack's registry, as the default configuration names it.
fn registry() -> SchemaRegistry {
    let config = txnflow::config::Config::from_layers([], []).unwrap();
    SchemaRegistry::new(&config.schema_registry).unwrap().expect("a registry URL by default")
}

/// One of the repository's schemas, registered under `subject`: its id and
/// the parsed schema.
async fn registered(registry: &SchemaRegistry, subject: &str, format: SchemaFormat) -> (u32, EventSchema) {
    let text = transaction_schema_text(format);
    let id = registry.register(subject, format, text).await.expect("the registry takes the schema");
    (id, EventSchema::parse(format, text).unwrap())
}

/// A JSON event's value framed for `id` with `schema`.
fn framed(schema: &EventSchema, id: u32, json: &[u8]) -> Vec<u8> {
    schema.frame(id, &serde_json::from_slice(json).unwrap()).unwrap()
}

/// 1,000 events each in Avro, Protobuf and JSON Schema, framed, and 1,000
/// plain JSON ones, mixed on one topic: the 4,000 are stored with the
/// same ids as the same events in JSON, each with the reference category,
/// nothing is dead-lettered, and offsets are committed to the end.
#[tokio::test]
async fn four_formats_on_one_topic_are_stored_alike() {
    let scenario = Scenario::new("formats").await;
    let registry = registry();
    let subject = |format: SchemaFormat| format!("{}-{}", scenario.topic, format.as_str());
    let mut schemas = Vec::new();
    for format in [SchemaFormat::Avro, SchemaFormat::Protobuf, SchemaFormat::JsonSchema] {
        schemas.push(registered(&registry, &subject(format), format).await);
    }
    let events = valid_events(30_001, 4_000);
    let mixed: Vec<(String, Vec<u8>)> = events
        .iter()
        .enumerate()
        .map(|(n, (key, json))| match schemas.get(n % 4) {
            Some((id, schema)) => (key.clone(), framed(schema, *id, json)),
            None => (key.clone(), json.clone()),
        })
        .collect();
    assert_eq!(mixed.iter().filter(|(_, value)| value[0] == 0).count(), 3_000, "3,000 framed");
    let service = scenario.start_service(&[]).await;
    let ends = Scenario::end_offsets(&scenario.produce(&mixed).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    let ids = ids_of(&events);
    assert_same_set(&scenario.transaction_ids(), &ids, "stored");
    let predicted = scenario.wait_for(Duration::from_secs(60), |s| s.predictions().len() == 4_000).await;
    assert!(predicted, "{}", service.log_tail());
    for (id, category) in scenario.predictions() {
        assert_eq!(category, reference_category(id), "{id}");
    }
    assert_eq!(service.metric("txnflow_records_total{outcome=\"invalid\",source=\"kafka\"}").await, 0.0);
}

/// Records the registry cannot account for: 20 framed for a schema id it
/// does not know and 20 Avro bodies cut short, among 200 good ones. Exactly
/// those 40 are dead-lettered as invalid, each with its reason and its
/// `schema_id` header, and their value unchanged.
#[tokio::test]
async fn unknown_schema_ids_and_corrupt_bodies_are_dead_lettered_with_their_schema_id() {
    let scenario = Scenario::new("schema-faults").await;
    let registry = registry();
    let (id, avro) = registered(&registry, &format!("{}-value", scenario.topic), SchemaFormat::Avro).await;
    let unknown_id = 2_000_000_000u32;
    let events = valid_events(30_002, 240);
    let mut bad: BTreeSet<Uuid> = BTreeSet::new();
    let records: Vec<(String, Vec<u8>)> = events
        .iter()
        .enumerate()
        .map(|(n, (key, json))| {
            let value = framed(&avro, id, json);
            let value = match n % 12 {
                0 => [wire_format::frame(unknown_id, &[]), value[5..].to_vec()].concat(),
                1 => value[..value.len() / 2].to_vec(),
                _ => return (key.clone(), value),
            };
            bad.insert(Uuid::parse_str(key).unwrap());
            (key.clone(), value)
        })
        .collect();
    assert_eq!(bad.len(), 40);
    let service = scenario.start_service(&[]).await;
    let sent = scenario.produce(&records).await;
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    let good: BTreeSet<Uuid> = ids_of(&events).difference(&bad).copied().collect();
    assert_same_set(&scenario.transaction_ids(), &good, "the 200 good ones stored");
    let letters = scenario.dlq(40);
    assert_eq!(letters.len(), 40);
    for letter in &letters {
        let (n, (_, value)) = records.iter().enumerate().find(|(_, (key, _))| *key == letter.key).unwrap();
        let header = |name: &str| letter.header(name);
        assert_eq!(header("error_type"), "invalid");
        assert_eq!(&letter.value, value, "the value as it was read");
        if n % 12 == 0 {
            assert_eq!(header("schema_id"), unknown_id.to_string());
            assert_eq!(header("error_message"), format!("schema id {unknown_id} not found in the registry"));
        } else {
            assert_eq!(header("schema_id"), id.to_string());
            assert!(
                header("error_message").starts_with("not an Avro record of its schema"),
                "{}",
                header("error_message")
            );
        }
    }
}

/// A TCP path to the local registry that a test can cut: while it is
/// down, every connection through it, open or new, is dropped.
struct RegistryPath {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl RegistryPath {
    async fn open() -> RegistryPath {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, watching) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watching = watching.clone();
                if !*watching.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:8081").await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watching.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        RegistryPath { port, up }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// The registry out of reach for 30 s, while 500 records framed for a
/// schema the service has not fetched yet (v2 of the subject's schema,
/// with an added optional field) arrive. No record is at fault: none is
/// dead-lettered or stored meanwhile, the offsets stay where they were,
/// and once the registry answers again all 1,000 are stored.
#[tokio::test]
async fn a_registry_out_of_reach_holds_reading_and_loses_nothing() {
    let scenario = Scenario::new("registry-down").await;
    let registry = registry();
    let subject = format!("{}-value", scenario.topic);
    let (v1_id, v1) = registered(&registry, &subject, SchemaFormat::Avro).await;
    registry.set_compatibility(&subject, "BACKWARD").await.unwrap();
    let mut v2_text: serde_json::Value = serde_json::from_str(TRANSACTION_AVRO).unwrap();
    v2_text["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "channel", "type": ["null", "string"], "default": null}
    ));
    let v2_id = registry.register(&subject, SchemaFormat::Avro, &v2_text.to_string()).await.unwrap();
    assert_ne!(v2_id, v1_id, "v2 is a new schema");
    let v2 = EventSchema::parse(SchemaFormat::Avro, &v2_text.to_string()).unwrap();

    let path = RegistryPath::open().await;
    let url = path.url();
    let service = scenario.start_service(&[("TXNFLOW__SCHEMA_REGISTRY__URL", url.as_str())]).await;
    let events = valid_events(30_003, 1_000);
    let (before, during) = events.split_at(500);
    let first: Vec<(String, Vec<u8>)> = before.iter().map(|(k, json)| (k.clone(), framed(&v1, v1_id, json))).collect();
    let ends = Scenario::end_offsets(&scenario.produce(&first).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());

    path.set(false);
    let second: Vec<(String, Vec<u8>)> = during
        .iter()
        .map(|(key, json)| {
            let mut event: serde_json::Value = serde_json::from_slice(json).unwrap();
            event["channel"] = "mobile".into();
            (key.clone(), v2.frame(v2_id, &event).unwrap())
        })
        .collect();
    let second_ends = Scenario::end_offsets(&scenario.produce(&second).await);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(scenario.committed_offsets(), ends, "nothing past the outage is committed");
    assert_eq!(scenario.count("SELECT count(*) FROM transactions"), 500, "nothing of v2 stored yet");
    assert_eq!(scenario.count("SELECT count(*) FROM dead_letters"), 0);
    assert_eq!(service.metric("txnflow_records_total{outcome=\"invalid\",source=\"kafka\"}").await, 0.0);

    path.set(true);
    let mut expected = ends.clone();
    for (partition, end) in second_ends {
        let at = expected.entry(partition).or_insert(0);
        *at = (*at).max(end);
    }
    assert_eq!(scenario.wait_committed(&expected, Duration::from_secs(120)).await, expected, "{}", service.log_tail());
    assert_same_set(&scenario.transaction_ids(), &ids_of(&events), "all 1,000 stored");
    for outcome in ["invalid", "dead_lettered"] {
        let metric = format!("txnflow_records_total{{outcome=\"{outcome}\",source=\"kafka\"}}");
        assert_eq!(service.metric(&metric).await, 0.0, "{outcome}");
    }
    let waits = service.metric("txnflow_schema_registry_unavailable_total").await;
    eprintln!(
        "schemas | registry out of reach 30 s with 500 records of a new schema id | stored 1,000, dead-lettered 0, {waits} fetches unanswered"
    );
    assert_eq!(scenario.count("SELECT count(*) FROM dead_letters"), 0);
}

/// `kafka.require_schema` (the last step of a move to a registry): 50
/// plain JSON records among 150 framed ones are dead-lettered as invalid,
/// with the reason `no schema` and no `schema_id` header; the framed ones
/// are stored.
#[tokio::test]
async fn required_schemas_send_plain_json_to_the_dlq() {
    let scenario = Scenario::new("require-schema").await;
    let registry = registry();
    let (id, avro) = registered(&registry, &format!("{}-value", scenario.topic), SchemaFormat::Avro).await;
    let events = valid_events(30_004, 200);
    let records: Vec<(String, Vec<u8>)> = events
        .iter()
        .enumerate()
        .map(|(n, (key, json))| (key.clone(), if n % 4 == 0 { json.clone() } else { framed(&avro, id, json) }))
        .collect();
    let service = scenario.start_service(&[("TXNFLOW__KAFKA__REQUIRE_SCHEMA", "true")]).await;
    let ends = Scenario::end_offsets(&scenario.produce(&records).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());
    let plain: BTreeSet<Uuid> = events.iter().step_by(4).map(|(key, _)| Uuid::parse_str(key).unwrap()).collect();
    let framed_ids: BTreeSet<Uuid> = ids_of(&events).difference(&plain).copied().collect();
    assert_same_set(&scenario.transaction_ids(), &framed_ids, "the 150 framed ones stored");
    let letters = scenario.dlq(50);
    let letter_ids: BTreeSet<Uuid> = letters.iter().map(|letter| Uuid::parse_str(&letter.key).unwrap()).collect();
    assert_same_set(&letter_ids, &plain, "the 50 plain ones dead-lettered");
    for letter in &letters {
        assert_eq!(letter.header("error_type"), "invalid");
        assert_eq!(letter.header("error_message"), "no schema: the record is not framed for the schema registry");
        assert_eq!(letter.header("schema_id"), "");
    }
}

/// Schema evolution under `BACKWARD`: v2 adds an optional field with a
/// default and is taken; v3 adds a required field without one, which old
/// records could not be read with, and the registry refuses it with 409.
#[tokio::test]
async fn the_registry_refuses_an_incompatible_schema_with_409() {
    let registry = registry();
    let subject = format!("evolution-{}-value", Uuid::new_v4());
    let (v1_id, _) = registered(&registry, &subject, SchemaFormat::Avro).await;
    registry.set_compatibility(&subject, "BACKWARD").await.unwrap();
    let with_field = |field: serde_json::Value| {
        let mut schema: serde_json::Value = serde_json::from_str(TRANSACTION_AVRO).unwrap();
        schema["fields"].as_array_mut().unwrap().push(field);
        schema.to_string()
    };
    let v2 = with_field(serde_json::json!({"name": "channel", "type": ["null", "string"], "default": null}));
    let v2_id = registry.register(&subject, SchemaFormat::Avro, &v2).await.unwrap();
    assert_ne!(v2_id, v1_id);
    let v3 = with_field(serde_json::json!({"name": "currency", "type": "string"}));
    let refused = registry.register(&subject, SchemaFormat::Avro, &v3).await.unwrap_err().to_string();
    assert!(refused.contains("409 Conflict"), "{refused}");
    eprintln!("schemas | an incompatible v3 under BACKWARD | {refused}");
}

/// The four formats written by Confluent's own Python producer and
/// serializers (confluent-kafka's `AvroSerializer`, `ProtobufSerializer`
/// and `JSONSerializer`, each registering the repository's schema itself;
/// `scripts/confluent_produce.py`), 1,000 events each on one topic: the
/// 4,000 are stored with the reference categories, none invalid.
#[tokio::test]
async fn records_from_confluents_serializers_are_stored_alike() {
    use std::io::Write;
    let scenario = Scenario::new("confluent").await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = txnflow::config::Config::from_layers([], []).unwrap();
    let events = valid_events(30_005, 4_000);
    for (chunk, format) in events.chunks(1_000).zip(["avro", "protobuf", "json_schema", "json"]) {
        let mut child = std::process::Command::new(root.join(".stack/venv/bin/python"))
            .arg(root.join("scripts/confluent_produce.py"))
            .args(["--brokers", &crate::helpers::brokers(), "--registry", &config.schema_registry.url])
            .args(["--topic", &scenario.topic, "--format", format])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the stack's Python (make up installs confluent-kafka)");
        let mut stdin = child.stdin.take().unwrap();
        for (_, json) in chunk {
            stdin.write_all(json).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{format}: {said}{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(said.trim(), format!("produced 1000 records as {format}"));
    }
    let service = scenario.start_service(&[]).await;
    let ids = ids_of(&events);
    let stored = scenario.wait_for(Duration::from_secs(120), |s| s.predictions().len() == 4_000).await;
    if !stored {
        let letter = &scenario.dlq(1)[0];
        panic!("not all stored; a dead letter: {}; {}", letter.header("error_message"), service.log_tail());
    }
    assert_same_set(&scenario.transaction_ids(), &ids, "stored");
    for (id, category) in scenario.predictions() {
        assert_eq!(category, reference_category(id), "{id}");
    }
    assert_eq!(service.metric("txnflow_records_total{outcome=\"invalid\",source=\"kafka\"}").await, 0.0);
}

/// `kafka.predictions_format = "avro"`: the 200 written predictions are
/// published framed for `prediction.avsc`, registered under
/// `<predictions topic>-value`, each read back with its transaction id
/// and reference category.
#[tokio::test]
async fn predictions_are_published_in_avro() {
    use apache_avro::types::Value;
    use txnflow::domain::schema_event::PREDICTION_AVRO;
    let scenario = Scenario::new("predictions-avro").await;
    let predictions_topic = format!("{}-predictions", scenario.topic);
    let service = scenario
        .start_service(&[
            ("TXNFLOW__KAFKA__PREDICTIONS_TOPIC", predictions_topic.as_str()),
            ("TXNFLOW__KAFKA__PREDICTIONS_FORMAT", "avro"),
        ])
        .await;
    let events = valid_events(30_006, 200);
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());
    let id =
        registry().register(&format!("{predictions_topic}-value"), SchemaFormat::Avro, PREDICTION_AVRO).await.unwrap();
    let schema = apache_avro::Schema::parse_str(PREDICTION_AVRO).unwrap();
    let published = crate::helpers::read_topic(&predictions_topic, 1, 200, Duration::from_secs(30));
    assert_eq!(published.len(), 200);
    let mut keys = BTreeSet::new();
    for record in &published {
        let wire_format::Framing::Framed { schema_id, body } = wire_format::framing(&record.value).unwrap() else {
            panic!("framed")
        };
        assert_eq!(schema_id, id);
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema).build().unwrap();
        let Value::Record(fields) = reader.read_value(&mut &body[..]).unwrap() else { panic!("a record") };
        let transaction = Uuid::parse_str(&record.key).unwrap();
        assert_eq!(fields[0].1, Value::Uuid(transaction));
        assert_eq!(fields[1].1, Value::String(reference_category(transaction).to_string()));
        keys.insert(transaction);
    }
    assert_same_set(&keys, &ids_of(&events), "one prediction per transaction");
}

/// An Apicurio registry of the test's own, serving HTTPS only, with a
/// certificate from a CA of the test's own and basic authentication for
/// one user; killed when the test ends.
struct SecuredRegistry {
    _process: crate::helpers::ChildGuard,
    url: String,
    ca: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl SecuredRegistry {
    async fn start(dir: &std::path::Path, username: &str, password: &str) -> SecuredRegistry {
        let (ca, cert, key) = crate::tls::make_certificates(dir, "registry");
        let stack = std::process::Command::new("bash")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh"))
            .arg("registry-command")
            .output()
            .unwrap();
        assert!(stack.status.success(), "{}", String::from_utf8_lossy(&stack.stderr));
        let said = String::from_utf8(stack.stdout).unwrap();
        let (java, jar) = said.trim().split_once('\n').expect("the registry's Java and jar");
        let port = crate::helpers::free_port();
        let log = dir.join("registry.log");
        let property = |name: &str, value: &str| format!("-D{name}={value}");
        let process = std::process::Command::new(java)
            .args(["-Xms64m", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .args([
                property("quarkus.http.host", "127.0.0.1"),
                property("quarkus.http.ssl-port", &port.to_string()),
                property("quarkus.http.insecure-requests", "disabled"),
                property("quarkus.http.ssl.certificate.files", &cert.display().to_string()),
                property("quarkus.http.ssl.certificate.key-files", &key.display().to_string()),
                property("quarkus.management.enabled", "false"),
                property("quarkus.http.auth.basic", "true"),
                property("quarkus.security.users.embedded.enabled", "true"),
                property("quarkus.security.users.embedded.plain-text", "true"),
                property(&format!("quarkus.security.users.embedded.users.{username}"), password),
                property(&format!("quarkus.security.users.embedded.roles.{username}"), "sr-admin"),
            ])
            .arg("-jar")
            .arg(jar)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let registry = SecuredRegistry {
            _process: crate::helpers::ChildGuard(process),
            url: format!("https://127.0.0.1:{port}/apis/ccompat/v7"),
            ca,
            log,
        };
        let client = registry.client();
        for _ in 0..1_200 {
            if client.get(format!("{}/subjects", registry.url)).send().await.is_ok() {
                return registry;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the secured registry did not answer in 120 s: {}", std::fs::read_to_string(&registry.log).unwrap());
    }

    /// An HTTP client that trusts the registry's CA, with no credentials.
    fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca).unwrap();
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap()).build().unwrap()
    }
}

/// A registry behind TLS and basic authentication. Without credentials it
/// answers 401, and without its CA no TLS connection is made. A service with a wrong password reads nothing for 15 s: no
/// record is at fault, so none is dead-lettered or stored, no offset moves,
/// and its log names the 401 and never the password. Restarted with the
/// password from a file and the CA from `ca_file`, it stores all 300.
#[tokio::test]
async fn a_registry_behind_tls_and_basic_auth_is_read_with_its_password_file_and_ca() {
    let dir = std::env::temp_dir().join(format!("txnflow-registry-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let secured = SecuredRegistry::start(&dir, "txnflow", &password).await;
    let anonymous = secured.client().get(format!("{}/subjects", secured.url)).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401, "no credentials");
    let untrusted = reqwest::get(format!("{}/subjects", secured.url)).await;
    assert!(untrusted.is_err_and(|e| e.is_connect()), "the test CA is not among the system's");

    let password_file = dir.join("registry-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let ca = secured.ca.display().to_string();
    let password_file = password_file.display().to_string();
    let mut config = txnflow::config::Config::from_layers([], []).unwrap().schema_registry;
    config.url = secured.url.clone();
    config.username = "txnflow".into();
    config.password = password.clone();
    config.ca_file = ca.clone();
    let registry = SchemaRegistry::new(&config).unwrap().unwrap();

    let scenario = Scenario::new("registry-secured").await;
    let (id, avro) = registered(&registry, &format!("{}-value", scenario.topic), SchemaFormat::Avro).await;
    let events = valid_events(30_007, 300);
    let records: Vec<(String, Vec<u8>)> = events.iter().map(|(k, json)| (k.clone(), framed(&avro, id, json))).collect();
    let ends = Scenario::end_offsets(&scenario.produce(&records).await);

    let url = secured.url.as_str();
    let mut refused = scenario
        .start_service(&[
            ("TXNFLOW__SCHEMA_REGISTRY__URL", url),
            ("TXNFLOW__SCHEMA_REGISTRY__USERNAME", "txnflow"),
            ("TXNFLOW__SCHEMA_REGISTRY__PASSWORD", "not-the-password"),
            ("TXNFLOW__SCHEMA_REGISTRY__CA_FILE", ca.as_str()),
        ])
        .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(refused.metric("txnflow_schema_registry_unavailable_total").await > 0.0, "{}", refused.log_tail());
    assert_eq!(refused.metric("txnflow_records_total{outcome=\"invalid\",source=\"kafka\"}").await, 0.0);
    assert_eq!(scenario.count("SELECT count(*) FROM transactions"), 0);
    assert_eq!(scenario.count("SELECT count(*) FROM dead_letters"), 0);
    assert!(scenario.committed_offsets().is_empty(), "no offset committed");
    let log = std::fs::read_to_string(&refused.log).unwrap();
    assert!(log.contains("401"), "the log names the registry's answer: {}", refused.log_tail());
    assert!(!log.contains("not-the-password"), "the log never repeats the password");
    refused.signal("TERM", Duration::from_secs(30)).expect("the service stops");

    let service = scenario
        .start_service(&[
            ("TXNFLOW__SCHEMA_REGISTRY__URL", url),
            ("TXNFLOW__SCHEMA_REGISTRY__USERNAME", "txnflow"),
            ("TXNFLOW__SCHEMA_REGISTRY__PASSWORD_FILE", password_file.as_str()),
            ("TXNFLOW__SCHEMA_REGISTRY__CA_FILE", ca.as_str()),
        ])
        .await;
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(60)).await, ends, "{}", service.log_tail());
    assert_same_set(&scenario.transaction_ids(), &ids_of(&events), "all 300 stored");
    assert_eq!(scenario.count("SELECT count(*) FROM dead_letters"), 0);
    let log = std::fs::read_to_string(&service.log).unwrap();
    assert!(!log.contains(&password), "the log never repeats the password");
    drop(service);
    drop(secured);
    let _ = std::fs::remove_dir_all(&dir);
}
