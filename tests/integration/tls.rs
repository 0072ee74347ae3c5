//! Kafka over TLS, end to end: a private Tansu whose advertised listener is
//! a TLS port, served by stunnel (Debian's `stunnel4`, which `make up`
//! installs) with a certificate signed by a CA the test makes. Every client
//! of the test and of the service goes through TLS.

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
fn make_certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
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

/// Tansu on a plain port, advertising the TLS port that stunnel serves.
struct TlsBroker {
    tls_port: u16,
    _tansu: ChildGuard,
    _stunnel: ChildGuard,
    ca: PathBuf,
    dir: PathBuf,
}

impl TlsBroker {
    fn start() -> TlsBroker {
        let dir = std::env::temp_dir().join(format!("txnflow-tls-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, cert, key) = make_certificates(&dir, "broker");
        let (plain_port, tls_port) = (free_port(), free_port());
        let cargo_home =
            std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap()));
        let tansu = Command::new(format!("{cargo_home}/bin/tansu"))
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{plain_port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{tls_port}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the stack's Tansu is installed (make up)");
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls_port}\nconnect = 127.0.0.1:{plain_port}\n\
                 cert = {}\nkey = {}\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let stunnel = Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 is installed (make up)");
        for port in [plain_port, tls_port] {
            let up = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(100));
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            assert!(up, "port {port} answers");
        }
        TlsBroker { tls_port, _tansu: ChildGuard(tansu), _stunnel: ChildGuard(stunnel), ca, dir }
    }

    /// The Kafka settings of a client that trusts `ca`.
    fn kafka(&self, ca: &Path) -> txnflow::config::KafkaConfig {
        txnflow::config::KafkaConfig {
            brokers: format!("127.0.0.1:{}", self.tls_port),
            security_protocol: "ssl".into(),
            ssl_ca_location: ca.display().to_string(),
            ..crate::helpers::default_config().kafka
        }
    }

    /// The environment of a `txnflow` process that trusts `ca`.
    fn env(&self, ca: &Path) -> Vec<(String, String)> {
        vec![
            ("TXNFLOW__KAFKA__BROKERS".into(), format!("127.0.0.1:{}", self.tls_port)),
            ("TXNFLOW__KAFKA__SECURITY_PROTOCOL".into(), "ssl".into()),
            ("TXNFLOW__KAFKA__SSL_CA_LOCATION".into(), ca.display().to_string()),
        ]
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
            .envs(broker.env(&broker.ca))
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
}

/// A CA that did not sign the broker's certificate: the client refuses the
/// broker, `/ready` answers 503 naming the broker with a TLS reason, and the
/// log says why, clearly.
#[tokio::test]
async fn a_wrong_ca_fails_ready_with_a_tls_error() {
    let broker = TlsBroker::start();
    let (other_ca, _, _) = make_certificates(&broker.dir, "other");
    let db = TestDatabase::create();
    let admin_port = free_port();
    let log = broker.dir.join("wrong-ca.log");
    let _service = ChildGuard(
        txnflow()
            .arg("run")
            .envs(broker.env(&other_ca))
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
            answer = Some((response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = answer.expect("the admin server answers");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["database"], "ok");
    let reason = body["broker"].as_str().unwrap().to_string();
    assert_ne!(reason, "ok");
    // librdkafka words it "SSL handshake failed: …certificate verify failed…"
    // or "…SSL routines::certificate verify failed (… in state SSL_HANDSHAKE)".
    assert!(reason.contains("certificate verify failed"), "/ready gives librdkafka's TLS reason: {reason:?}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("certificate verify failed"),
        "the log names the TLS failure; /ready said {reason:?}; log:\n{log_text}"
    );
    eprintln!("tls | wrong CA | /ready 503, broker: {reason}");
}
