//! Kafka over TLS, and SASL_SSL with SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN,
//! end to end against the local cluster's own listeners (`make up`): SSL on
//! ports 9192-9194 and SASL_SSL on 9292-9294, with a certificate signed by
//! the stack's CA (`.stack/kafka/tls/ca.pem`). Every client of the test and
//! of the service goes through TLS. SCRAM users are created per test with
//! Kafka's own `kafka-configs` (`ConfigCommand`); the PLAIN user is in the
//! brokers' JAAS configuration, with the password `make up` made.

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

use crate::helpers::{ChildGuard, TestDatabase, assert_same_set, free_port, no_faults, spawn_ml_api, txnflow};
use crate::scenario::{ids_of, invalid_events, valid_events};

/// A CA, and a certificate for 127.0.0.1 signed by it, made with openssl.
pub fn make_certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = dir.join(format!("{name}-ca.key"));
    let ca = dir.join(format!("{name}-ca.pem"));
    let key = dir.join(format!("{name}-server.key"));
    let csr = dir.join(format!("{name}-server.csr"));
    let cert = dir.join(format!("{name}-server.pem"));
    let ext = dir.join(format!("{name}-ext.cnf"));
    std::fs::write(&ext, "subjectAltName = IP:127.0.0.1, DNS:localhost\n").unwrap();
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    let path = |p: &PathBuf| p.display().to_string();
    openssl(
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &format!("/CN={name} test CA")]
            .iter()
            .copied()
            .chain(["-keyout", &path(&ca_key), "-out", &path(&ca)])
            .collect::<Vec<_>>(),
    );
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path(&key),
        "-out",
        &path(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(&ca),
        "-CAkey",
        &path(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path(&ext),
        "-out",
        &path(&cert),
    ]);
    (ca, cert, key)
}

/// The stack's Kafka state: jars, CA, the PLAIN user's password.
fn stack_kafka() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack/kafka")
}

/// Runs Kafka's `kafka-configs` with the stack's jars: creates `user` with
/// `password` for `mechanism`, over the plaintext listener.
fn create_scram_user(user: &str, password: &str, mechanism: &str) {
    let lib = stack_kafka().join("lib/*");
    let output = Command::new("java")
        .arg("-cp")
        .arg(lib)
        .arg("-Dlog4j2.level=warn")
        .args(["org.apache.kafka.tools.ConfigCommand", "--bootstrap-server", &crate::helpers::brokers()])
        .args(["--alter", "--entity-type", "users", "--entity-name", user, "--add-config"])
        .arg(format!("{mechanism}=[iterations=4096,password={password}]"))
        .output()
        .expect("java runs (make up)");
    assert!(output.status.success(), "kafka-configs: {}", String::from_utf8_lossy(&output.stderr));
}

/// One of the cluster's secure listeners, and who logs in there.
struct TlsBroker {
    brokers: String,
    ca: PathBuf,
    dir: PathBuf,
    /// The SASL user (name, password, mechanism) every client logs in as, if any.
    sasl: Option<(String, String, &'static str)>,
}

impl TlsBroker {
    fn new(brokers: &str, sasl: Option<(String, String, &'static str)>) -> TlsBroker {
        let dir = std::env::temp_dir().join(format!("txnflow-tls-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = stack_kafka().join("tls/ca.pem");
        assert!(ca.exists(), "the stack's CA {} exists (make up)", ca.display());
        TlsBroker { brokers: brokers.to_string(), ca, dir, sasl }
    }

    /// The SSL listener: TLS only.
    fn start() -> TlsBroker {
        TlsBroker::new("127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194", None)
    }

    /// The SASL_SSL listener, as a new SCRAM user (SCRAM-SHA-256 or -512).
    fn with_scram_user(user: &str, password: &str, mechanism: &'static str) -> TlsBroker {
        let user = format!("{user}-{}", Uuid::new_v4().simple());
        create_scram_user(&user, password, mechanism);
        TlsBroker::sasl(user, password.to_string(), mechanism)
    }

    /// The SASL_SSL listener, as the brokers' PLAIN user.
    fn with_plain_user() -> TlsBroker {
        let password = std::fs::read_to_string(stack_kafka().join("plain-password")).expect("make up wrote it");
        TlsBroker::sasl("txnflow-plain".into(), password.trim().to_string(), "PLAIN")
    }

    fn sasl(user: String, password: String, mechanism: &'static str) -> TlsBroker {
        TlsBroker::new("127.0.0.1:9292,127.0.0.1:9293,127.0.0.1:9294", Some((user, password, mechanism)))
    }

    /// The Kafka settings of a client that trusts `ca` (and logs in as the user).
    fn kafka(&self, ca: &Path) -> txnflow::config::KafkaConfig {
        let mut kafka = txnflow::config::KafkaConfig {
            brokers: self.brokers.clone(),
            security_protocol: "ssl".into(),
            ssl_ca_location: ca.display().to_string(),
            ..crate::helpers::default_config().kafka
        };
        if let Some((user, password, mechanism)) = &self.sasl {
            kafka.security_protocol = "sasl_ssl".into();
            kafka.sasl_mechanism = mechanism.to_string();
            kafka.sasl_username = user.clone();
            kafka.sasl_password = password.clone();
        }
        kafka
    }

    /// The environment of a `txnflow` process that trusts `ca`, and logs in
    /// with `password` (from a file) on the SASL listener.
    fn env(&self, ca: &Path, password: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![
            ("TXNFLOW__KAFKA__BROKERS".into(), self.brokers.clone()),
            ("TXNFLOW__KAFKA__SECURITY_PROTOCOL".into(), "ssl".into()),
            ("TXNFLOW__KAFKA__SSL_CA_LOCATION".into(), ca.display().to_string()),
        ];
        if let (Some((user, _, mechanism)), Some(password)) = (&self.sasl, password) {
            let file = self.dir.join(format!("password-{}", Uuid::new_v4().simple()));
            std::fs::write(&file, password).unwrap();
            env[1].1 = "sasl_ssl".into();
            env.push(("TXNFLOW__KAFKA__SASL_MECHANISM".into(), mechanism.to_string()));
            env.push(("TXNFLOW__KAFKA__SASL_USERNAME".into(), user.clone()));
            env.push(("TXNFLOW__KAFKA__SASL_PASSWORD_FILE".into(), file.display().to_string()));
        }
        env
    }

    fn password(&self) -> Option<&str> {
        self.sasl.as_ref().map(|(_, password, _)| password.as_str())
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pipeline over TLS: events produced over TLS are stored and
/// predicted, the invalid ones dead-lettered over TLS, and the commits reach
/// the end offsets.
#[tokio::test]
async fn the_pipeline_runs_over_tls() {
    let broker = TlsBroker::start();
    the_pipeline_runs_on(&broker).await;
}

/// The same over SASL_SSL with SCRAM-SHA-512: the service logs in with the
/// password from a file, and never writes it to its log.
#[tokio::test]
async fn the_pipeline_runs_over_sasl_ssl_with_scram_sha_512() {
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let broker = TlsBroker::with_scram_user("txnflow", &password, "SCRAM-SHA-512");
    let log = the_pipeline_runs_on(&broker).await;
    assert!(!log.contains(&password), "the password never reaches the log");
    eprintln!("tls | SASL_SSL SCRAM-SHA-512 | 500 stored, 20 dead-lettered, commits at the end offsets");
}

#[tokio::test]
async fn the_pipeline_runs_over_sasl_ssl_with_scram_sha_256() {
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let broker = TlsBroker::with_scram_user("txnflow", &password, "SCRAM-SHA-256");
    let log = the_pipeline_runs_on(&broker).await;
    assert!(!log.contains(&password), "the password never reaches the log");
    eprintln!("tls | SASL_SSL SCRAM-SHA-256 | 500 stored, 20 dead-lettered, commits at the end offsets");
}

/// SASL PLAIN over TLS, which the broker checks against its JAAS users.
#[tokio::test]
async fn the_pipeline_runs_over_sasl_ssl_with_plain() {
    let broker = TlsBroker::with_plain_user();
    let log = the_pipeline_runs_on(&broker).await;
    assert!(!log.contains(broker.password().unwrap()), "the password never reaches the log");
    eprintln!("tls | SASL_SSL PLAIN | 500 stored, 20 dead-lettered, commits at the end offsets");
}

/// Runs 500 valid and 20 invalid events through a service on `broker`;
/// returns the service's log.
async fn the_pipeline_runs_on(broker: &TlsBroker) -> String {
    let kafka = broker.kafka(&broker.ca);
    let topic = format!("test-tls-{}", Uuid::new_v4().simple());
    let dlq = format!("{topic}-dlq");
    txnflow::kafka::ensure_topics(&kafka, &[(&topic, 3), (&dlq, 1)]).await.expect("topics over TLS");
    let db = TestDatabase::create();
    let ml_api = spawn_ml_api(no_faults());
    let admin_port = free_port();
    let log = broker.dir.join("service.log");
    let group = format!("{topic}-group");
    let _service = ChildGuard(
        txnflow()
            .arg("run")
            .envs(broker.env(&broker.ca, broker.password()))
            .env("TXNFLOW__KAFKA__TOPIC", &topic)
            .env("TXNFLOW__KAFKA__DLQ_TOPIC", &dlq)
            .env("TXNFLOW__KAFKA__GROUP_ID", &group)
            .env("TXNFLOW__DB__URL", &db.url)
            .env("TXNFLOW__PREDICT__URL", format!("http://{ml_api}"))
            .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let valid = valid_events(1201, 500);
    let invalid = invalid_events(1202, 20);
    let producer = txnflow::kafka::producer(&kafka).unwrap();
    let mut ends = std::collections::BTreeMap::new();
    for (key, value) in valid.iter().chain(&invalid) {
        let delivery = producer
            .send(FutureRecord::to(&topic).key(key).payload(value), Duration::from_secs(30))
            .await
            .expect("produced over TLS");
        let end = ends.entry(delivery.partition).or_insert(0i64);
        *end = (*end).max(delivery.offset + 1);
    }
    let consumer: BaseConsumer = txnflow::kafka::client_config(&kafka).set("group.id", &group).create().unwrap();
    let committed = || {
        let mut partitions = rdkafka::TopicPartitionList::new();
        for partition in 0..3 {
            partitions.add_partition(&topic, partition);
        }
        consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
            .unwrap_or_default()
    };
    let mut reached = false;
    for _ in 0..240 {
        if committed() == ends {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let tail = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(reached, "committed {:?}, ends {ends:?}; log:\n{tail}", committed());
    let stored: BTreeSet<Uuid> = crate::helpers::query_json(&mut db.connect(), "SELECT id FROM transactions")
        .iter()
        .map(|row| row["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_same_set(&stored, &ids_of(&valid), "stored over TLS");
    let predicted = crate::helpers::query_json(&mut db.connect(), "SELECT count(*) AS n FROM predictions");
    assert_eq!(predicted[0]["n"], 500);
    // The DLQ, read back over TLS.
    let reader: BaseConsumer = txnflow::kafka::client_config(&kafka)
        .set("group.id", format!("reader-{}", Uuid::new_v4().simple()))
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment.add_partition_offset(&dlq, 0, rdkafka::Offset::Beginning).unwrap();
    reader.assign(&assignment).unwrap();
    let mut dead = BTreeSet::new();
    for _ in 0..300 {
        if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
            dead.insert(String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned());
        }
        if dead.len() == 20 {
            break;
        }
    }
    let expected: BTreeSet<String> = invalid.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(dead, expected, "the invalid events in the DLQ, over TLS");
    std::fs::read_to_string(&log).unwrap()
}

/// Starts a service on `broker` with `env`, which the broker should refuse;
/// returns the first `/ready` answer whose broker reason `names` accepts
/// (or the last one), and the service's log by then.
async fn refused_start(
    broker: &TlsBroker,
    env: Vec<(String, String)>,
    names: impl Fn(&str) -> bool,
) -> (u16, serde_json::Value, String) {
    let db = TestDatabase::create();
    let admin_port = free_port();
    let log = broker.dir.join(format!("refused-{admin_port}.log"));
    let _service = ChildGuard(
        txnflow()
            .arg("run")
            .envs(env)
            .env("TXNFLOW__KAFKA__TOPIC", format!("test-tls-{}", Uuid::new_v4().simple()))
            .env("TXNFLOW__DB__URL", &db.url)
            .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let mut answer = None;
    for _ in 0..300 {
        if let Ok(response) = client.get(format!("http://127.0.0.1:{admin_port}/ready")).send().await {
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            let named = body["broker"].as_str().is_some_and(&names);
            answer = Some((status, body));
            if named {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = answer.expect("the admin server answers");
    (status, body, std::fs::read_to_string(&log).unwrap())
}

/// A CA that did not sign the broker's certificate: the client refuses the
/// broker, `/ready` answers 503 naming the broker with a TLS reason, and the
/// log says why, clearly.
#[tokio::test]
async fn a_wrong_ca_fails_ready_with_a_tls_error() {
    let broker = TlsBroker::start();
    let (other_ca, _, _) = make_certificates(&broker.dir, "other");
    // librdkafka words it "SSL handshake failed: …certificate verify failed…"
    // or "…SSL routines::certificate verify failed (… in state SSL_HANDSHAKE)".
    let tls_reason = |reason: &str| reason.contains("certificate verify failed");
    let (status, body, log) = refused_start(&broker, broker.env(&other_ca, None), tls_reason).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["database"], "ok");
    let reason = body["broker"].as_str().unwrap().to_string();
    assert!(tls_reason(&reason), "/ready gives librdkafka's TLS reason: {reason:?}");
    assert!(tls_reason(&log), "the log names the TLS failure; /ready said {reason:?}; log:\n{log}");
    eprintln!("tls | wrong CA | /ready 503, broker: {reason}");
}

/// A wrong password: the broker refuses the login, `/ready` answers 503
/// with librdkafka's SASL reason, and neither the answer nor the log
/// repeats either password.
async fn a_wrong_password_fails_ready_without_repeating_it(broker: TlsBroker) {
    let right = broker.password().unwrap().to_string();
    let mechanism = broker.sasl.as_ref().unwrap().2;
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let sasl_reason = |reason: &str| reason.contains("SASL") || reason.contains("uthentication");
    let (status, body, log) = refused_start(&broker, broker.env(&broker.ca, Some(&wrong)), sasl_reason).await;
    assert_eq!(status, 503, "{body}");
    let reason = body["broker"].as_str().unwrap().to_string();
    assert!(sasl_reason(&reason), "/ready gives librdkafka's SASL reason: {reason:?}; log:\n{log}");
    assert!(sasl_reason(&log), "the log names the SASL failure:\n{log}");
    assert!(!body.to_string().contains(&wrong) && !log.contains(&wrong), "the password is never repeated");
    assert!(!body.to_string().contains(&right) && !log.contains(&right), "nor the user's");
    eprintln!("tls | wrong {mechanism} password | /ready 503, broker: {reason}");
}

#[tokio::test]
async fn a_wrong_scram_sha_256_password_fails_ready_without_repeating_it() {
    let broker = TlsBroker::with_scram_user("txnflow", &format!("pw-{}", Uuid::new_v4().simple()), "SCRAM-SHA-256");
    a_wrong_password_fails_ready_without_repeating_it(broker).await;
}

#[tokio::test]
async fn a_wrong_scram_sha_512_password_fails_ready_without_repeating_it() {
    let broker = TlsBroker::with_scram_user("txnflow", &format!("pw-{}", Uuid::new_v4().simple()), "SCRAM-SHA-512");
    a_wrong_password_fails_ready_without_repeating_it(broker).await;
}

#[tokio::test]
async fn a_wrong_plain_password_fails_ready_without_repeating_it() {
    a_wrong_password_fails_ready_without_repeating_it(TlsBroker::with_plain_user()).await;
}
