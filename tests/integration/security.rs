//! The admin surface is closed by default (guarantee 10): a token on
//! every endpoint but the probes, no listen beyond loopback without one,
//! `POST /batches` limited to the allowed buckets and local roots, and no
//! answer or log line that repeats an input file's content.

use serde_json::json;
use std::path::Path;

use crate::helpers::{free_port, run, stderr, txnflow};
use crate::scenario::Scenario;

const TOKEN: &str = "test-admin-token-0123456789";
/// The first line of the files the tests try to read: no answer or log may hold it.
const SECRET_LINE: &str = "TOPSECRET-first-line-of-a-secret";

async fn post_batch(service: &crate::scenario::Service, uri: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().post(format!("{}/batches", service.admin)).json(&json!({"uri": uri}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A root with one good CSV and a symlink out of it, and secret files beside it.
fn local_files(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("good.csv"),
        "id;description;amount;timestamp;merchant;operation_type;side\n\
         sec-1;\"Card expense at EDF\";-12,50;\"2026-01-02 10:00:00\";\"EDF\";\"payment\";\"debit\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("secret.csv"), format!("{SECRET_LINE}\nmore\n")).unwrap();
    std::fs::write(dir.join("secret"), format!("{SECRET_LINE}\n")).unwrap();
    std::os::unix::fs::symlink(dir.join("secret.csv"), root.join("link.csv")).unwrap();
    root
}

#[tokio::test]
async fn post_batches_reads_only_allowed_buckets_and_local_roots() {
    let dir = std::env::temp_dir().join(format!("txnflow-security-{}", uuid::Uuid::new_v4().simple()));
    let root = local_files(&dir);
    let scenario = Scenario::new("security").await;
    let root_setting = root.display().to_string();
    let service = scenario
        .start_service(&[
            ("TXNFLOW__ADMIN__TOKEN", TOKEN),
            ("TXNFLOW__BATCH__LOCAL_ROOTS", root_setting.as_str()),
            ("TXNFLOW__S3__BUCKET", "transactions"),
        ])
        .await;
    let root_text = root.display().to_string();
    let cases = [
        ("/etc/passwd".to_string(), 403),
        ("file:///etc/passwd".to_string(), 403),
        (format!("{root_text}/../secret.csv"), 403),
        (format!("{root_text}/../secret"), 403),
        (format!("file://{root_text}/../../../../etc/passwd"), 403),
        (format!("{root_text}/link.csv"), 403),
        ("relative/path.csv".to_string(), 403),
        ("s3://not-allowed/x.csv".to_string(), 403),
        ("ftp://host/x.csv".to_string(), 400),
        (format!("{root_text}/missing.csv"), 400),
    ];
    for (uri, status) in &cases {
        let (answered, body) = post_batch(&service, uri, Some(TOKEN)).await;
        assert_eq!(answered, *status, "{uri}: {body}");
        assert!(!body.contains(SECRET_LINE) && !body.contains("root:x:"), "{uri}: the answer repeats the file: {body}");
    }
    // The symlink is not listed either when the root itself is posted.
    let (status, body) = post_batch(&service, &root_text, Some(TOKEN)).await;
    assert_eq!(status, 202, "{body}");
    let run_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["run_id"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let mut report = serde_json::Value::Null;
    for _ in 0..300 {
        report = client
            .get(format!("{}/batches/{run_id}", service.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if report["status"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!((report["files"].as_u64(), report["read"].as_u64()), (Some(1), Some(1)), "{report}");
    assert_eq!(scenario.count("SELECT count(*) FROM transactions"), 1);
    let log = std::fs::read_to_string(&service.log).unwrap();
    assert!(!log.contains(SECRET_LINE) && !log.contains("root:x:"), "the log repeats a file's content");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_token_guards_every_endpoint_but_the_probes() {
    let scenario = Scenario::new("token").await;
    let service =
        scenario.start_service(&[("TXNFLOW__ADMIN__TOKEN", TOKEN), ("TXNFLOW__CHAOS__ENABLED", "false")]).await;
    let client = reqwest::Client::new();
    for path in ["/health", "/ready", "/metrics"] {
        let status = client.get(format!("{}{path}", service.admin)).send().await.unwrap().status().as_u16();
        assert_eq!(status, 200, "{path} needs no token");
    }
    let get = |path: &str, token: Option<&str>| {
        let mut request = client.get(format!("{}{path}", service.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get("/batches/any", None).await.unwrap().status().as_u16(), 401);
    assert_eq!(get("/batches/any", Some("wrong-token-wrong-token")).await.unwrap().status().as_u16(), 401);
    assert_eq!(get("/batches/any", Some(TOKEN)).await.unwrap().status().as_u16(), 404, "no such run");
    let (status, body) = post_batch(&service, "s3://transactions/x.csv", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains(TOKEN));
    let chaos = |token: Option<&str>| {
        let mut request = client.post(format!("{}/chaos/buffer/crash", service.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(chaos(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(chaos(Some(TOKEN)).await.unwrap().status().as_u16(), 404, "chaos is off by default");
    let log = std::fs::read_to_string(&service.log).unwrap();
    assert!(!log.contains(TOKEN), "the token is never logged");
}

/// 202 with the token, for a file under a local root.
#[tokio::test]
async fn a_batch_posted_with_the_token_is_accepted() {
    let dir = std::env::temp_dir().join(format!("txnflow-accepted-{}", uuid::Uuid::new_v4().simple()));
    let root = local_files(&dir);
    let scenario = Scenario::new("accepted").await;
    let root_setting = root.display().to_string();
    let service = scenario
        .start_service(&[("TXNFLOW__ADMIN__TOKEN", TOKEN), ("TXNFLOW__BATCH__LOCAL_ROOTS", root_setting.as_str())])
        .await;
    let good = root.join("good.csv").display().to_string();
    assert_eq!(post_batch(&service, &good, None).await.0, 401);
    let (status, body) = post_batch(&service, &good, Some(TOKEN)).await;
    assert_eq!(status, 202, "{body}");
    let stored = scenario.wait_for(std::time::Duration::from_secs(30), |s| s.transaction_ids().len() == 1).await;
    assert!(stored, "{}", service.log_tail());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Beyond loopback without a token: exit 2 naming the key, before anything
/// connects. A token, or the explicit escape, lets the check pass.
#[test]
fn a_non_loopback_listen_without_a_token_refuses_to_start() {
    let port = free_port();
    let output = run(txnflow()
        .arg("run")
        .env("TXNFLOW__ADMIN__LISTEN", format!("0.0.0.0:{port}"))
        // Nothing may be reached first: a dead database and broker would hang it.
        .env("TXNFLOW__DB__URL", "postgres://nobody:secret-password@127.0.0.1:1/none")
        .env("TXNFLOW__KAFKA__BROKERS", "127.0.0.1:1"));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("admin.token"), "{message}");
    assert!(!message.contains("secret-password"), "{message}");

    let short = run(txnflow().arg("run").env("TXNFLOW__ADMIN__TOKEN", "short"));
    assert_eq!(short.status.code(), Some(2));
    assert!(stderr(&short).contains("admin.token"), "{}", stderr(&short));
    assert!(!stderr(&short).contains("short\""), "the token is not repeated: {}", stderr(&short));
}

/// `txnflow batch` is the operator's own shell: it reads local paths, and a
/// file that is not a transactions CSV fails at once without its content in
/// the message, before the broker or the database is tried.
#[test]
fn the_cli_names_missing_columns_only_and_fails_before_connecting() {
    let dir = std::env::temp_dir().join(format!("txnflow-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret.csv");
    std::fs::write(&secret, format!("{SECRET_LINE}\n")).unwrap();
    let started = std::time::Instant::now();
    let output = run(txnflow()
        .arg("batch")
        .arg(&secret)
        .env("TXNFLOW__KAFKA__BROKERS", "127.0.0.1:1")
        .env("TXNFLOW__DB__URL", "postgres://nobody:x@127.0.0.1:1/none"));
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("the header lacks the required column(s)"), "{message}");
    assert!(!message.contains(SECRET_LINE), "{message}");
    let passwd = run(txnflow().args(["batch", "/etc/passwd"]).env("TXNFLOW__KAFKA__BROKERS", "127.0.0.1:1"));
    assert_eq!(passwd.status.code(), Some(1));
    assert!(!stderr(&passwd).contains("root:x:"), "{}", stderr(&passwd));
    eprintln!("a bad input failed in {took:?}, with nothing reachable");
    std::fs::remove_dir_all(&dir).unwrap();
}
