//! The status page in a real browser: headless Chromium, driven by
//! playwright-core (`tests/browser/driver.cjs`), against `txnflow run`
//! with the stack, a producer, a batch run, an ML API outage and a poison
//! record. Screenshots go to `target/status-page/`.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::batch::Folder;
use crate::helpers::seed_csv_path;
use crate::scenario::{Scenario, Sent, valid_events};

const TOKEN: &str = "status-page-test-token";

/// The Node.js driver of one headless Chromium.
struct Browser {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Browser {
    fn start() -> Browser {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let library = root.join(".stack/browser/node_modules/playwright-core");
        assert!(
            library.exists() && std::path::Path::new("/usr/bin/chromium").exists(),
            "the browser test needs Debian's chromium and playwright-core in .stack/browser: run `make up`"
        );
        let mut child = Command::new("node")
            .arg(root.join("tests/browser/driver.cjs"))
            .env("PLAYWRIGHT_CORE", library)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node starts");
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Browser { child, input, output }
    }

    /// Sends one command and waits for its answer (blocking: on a
    /// multi-threaded runtime, the producer's task goes on meanwhile).
    fn call(&mut self, command: Value) -> Result<Value, String> {
        tokio::task::block_in_place(|| {
            writeln!(self.input, "{command}").expect("the driver reads");
            let mut line = String::new();
            self.output.read_line(&mut line).expect("the driver answers");
            let answer: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line:?}"));
            let page_errors = answer["page_errors"].as_array().cloned().unwrap_or_default();
            assert!(page_errors.is_empty(), "the page's script failed: {page_errors:?}");
            match answer["ok"].as_bool() {
                Some(true) => Ok(answer["value"].clone()),
                _ => Err(answer["error"].as_str().unwrap_or("no error given").to_string()),
            }
        })
    }

    /// Waits until `js` is truthy on the page, and answers its value.
    fn wait(&mut self, what: &str, js: &str, seconds: u64) -> Value {
        self.call(json!({"do": "wait", "js": js, "timeout_ms": seconds * 1000}))
            .unwrap_or_else(|error| panic!("{what}: {error}"))
    }

    fn eval(&mut self, js: &str) -> Value {
        self.call(json!({"do": "eval", "js": js})).unwrap_or_else(|error| panic!("{js}: {error}"))
    }

    /// The whole page into `target/status-page/<name>.png`; `window` only what the window shows.
    fn screenshot_of(&mut self, name: &str, full_page: bool) {
        let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/status-page");
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join(format!("{name}.png"));
        self.call(json!({"do": "screenshot", "path": path, "full_page": full_page})).expect("a screenshot");
    }

    fn screenshot(&mut self, name: &str) {
        self.screenshot_of(name, true);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.input, "{}", json!({"do": "close"}));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces 50 valid events every 300 ms until `running` turns false;
/// answers where they all landed.
fn keep_producing(scenario: Arc<Scenario>, running: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Sent>> {
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut seed = 900;
        while running.load(Ordering::Relaxed) {
            sent.extend(scenario.produce(&valid_events(seed, 50)).await);
            seed += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        sent
    })
}

/// `n` as the page writes it (`toLocaleString('en')`): 12,345.
fn with_commas(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Every row of the page's partitions table: (partition, committed offset, lag), as shown.
const PARTITION_ROWS: &str = "[...document.querySelectorAll('#partitions tbody tr')]
    .map(row => [...row.cells].map(cell => cell.textContent))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_flow_in_a_real_browser() {
    let scenario = Arc::new(Scenario::new("statuspage").await);
    let breaker: [(&str, &str); 6] = [
        ("TXNFLOW__ADMIN__TOKEN", TOKEN),
        ("TXNFLOW__BREAKER__WINDOW", "10"),
        ("TXNFLOW__BREAKER__OPEN_MS", "3000"),
        ("TXNFLOW__PREDICT__MAX_RETRIES", "1"),
        ("TXNFLOW__PREDICT__RETRY_MAX_BACKOFF_MS", "200"),
        ("TXNFLOW__PREDICT__TIMEOUT_MS", "2000"),
    ];
    let service = scenario.start_service(&breaker).await;
    let running = Arc::new(AtomicBool::new(true));
    let producer = keep_producing(scenario.clone(), running.clone());
    let mut browser = Browser::start();

    // Signing in: the form first, a wrong token refused, the right one kept.
    browser.call(json!({"do": "open", "url": format!("{}/", service.admin)})).expect("the page opens");
    browser.wait("the sign-in form", "!document.querySelector('#login').hidden", 10);
    browser.call(json!({"do": "login", "token": "not-the-token"})).unwrap();
    let refused =
        browser.wait("a wrong token's error", "document.querySelector('#login-error').textContent || false", 10);
    assert_eq!(refused, "That token was refused.");
    assert_eq!(browser.eval("document.querySelector('#status').hidden"), true, "no data without the token");
    browser.screenshot("1-wrong-token");
    browser.call(json!({"do": "login", "token": TOKEN})).unwrap();
    browser.wait("the status after signing in", "!document.querySelector('#status').hidden", 10);
    assert_eq!(browser.eval("sessionStorage.getItem('txnflow.admin.token')"), TOKEN, "kept in the tab's session");
    assert_eq!(browser.eval("location.href"), format!("{}/", service.admin), "never in the URL");

    // The charts draw series with values above zero.
    for series in ["in", "written", "predicted"] {
        let drawn = format!(
            "(() => {{ const points = document.querySelector('#rate-{series} polyline').getAttribute('points') || '';
                      const ys = points.split(' ').filter(Boolean).map(p => Number(p.split(',')[1]));
                      return ys.length >= 3 && ys.some(y => y < 78) && ys.length; }})()"
        );
        browser.wait(&format!("the {series} chart"), &drawn, 30);
    }
    browser.wait(
        "every partition's row",
        &format!("{PARTITION_ROWS}.length === {} && {PARTITION_ROWS}", crate::scenario::PARTITIONS),
        30,
    );
    browser.screenshot("2-streaming");

    // A poison record: listed with its reason and source, not its content.
    let marker = format!("POISON-{}", uuid::Uuid::new_v4().simple());
    let poison = scenario.produce(&[(format!("poison-{marker}"), format!("{{not json {marker}").into_bytes())]).await;
    let source = format!("{}/{}/{}", scenario.topic, poison[0].partition, poison[0].offset);
    let listed = browser.wait(
        "the poison record in the dead letters",
        &format!(
            "[...document.querySelectorAll('#dead-letters tbody tr')]
                .map(row => [...row.cells].map(cell => cell.textContent))
                .find(cells => cells[4] === '{source}')"
        ),
        30,
    );
    let cells: Vec<&str> = listed.as_array().unwrap().iter().map(|cell| cell.as_str().unwrap()).collect();
    assert_eq!(&cells[1..], ["invalid", "decode", cells[3], source.as_str(), "DLQ topic"], "{cells:?}");
    assert!(cells[3].starts_with("malformed JSON: "), "{cells:?}");
    assert_eq!(browser.eval(&format!("document.documentElement.outerHTML.includes('{marker}')")), false);
    browser.screenshot("3-dead-letter");

    // A batch run started beside the stream: its bar reaches 100%.
    let folder = Folder::new().await;
    let uri = folder.put("transactions_fr.csv", std::fs::read(seed_csv_path()).unwrap()).await;
    let client = reqwest::Client::new();
    let started: Value = client
        .post(format!("{}/batches", service.admin))
        .bearer_auth(TOKEN)
        .json(&json!({"uri": uri}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = started["run_id"].as_str().expect("a run id").to_string();
    let row = format!("document.querySelector('#batches tr[data-run-id=\"{run_id}\"]')");
    let finished = browser.wait(
        "the batch run's bar at 100%",
        &format!(
            "{row} && {row}.querySelector('progress').value === 100
                && [{row}.querySelector('.run-status').textContent, {row}.cells[2].textContent]"
        ),
        180,
    );
    assert_eq!(finished, json!(["completed", " 100.0%"]));
    browser.screenshot("4-batch-done");

    // An ML API outage opens the breaker on the page, and its end closes it.
    scenario.set_faults(json!({"error_rate": 1.0})).await;
    let state = "document.querySelector('#breaker-state').textContent";
    browser.wait("the breaker open", &format!("{state} === 'open'"), 60);
    browser.screenshot("5-breaker-open");
    scenario.set_faults(json!({"error_rate": 0.0})).await;
    browser.wait("the breaker closed again", &format!("{state} === 'closed'"), 60);
    let transitions = browser.eval(
        "[...document.querySelectorAll('#breaker-transitions li')].map(item => item.textContent.split(' ').slice(1).join(' '))",
    );
    let transitions: Vec<&str> = transitions.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    // Newest first; the outage may have sent a trial or two back to open before the fault ended.
    assert_eq!(transitions.first(), Some(&"half_open → closed"), "newest first: {transitions:?}");
    assert!(transitions.contains(&"closed → open"), "{transitions:?}");

    // The producer stops: every partition's lag falls to 0, at the committed end.
    running.store(false, Ordering::Relaxed);
    let mut sent = producer.await.unwrap();
    sent.extend(poison);
    let ends = Scenario::end_offsets(&sent);
    assert_eq!(scenario.wait_committed(&ends, Duration::from_secs(120)).await, ends, "{}", service.log_tail());
    let expected: Vec<Vec<String>> = (0..crate::scenario::PARTITIONS)
        .map(|partition| {
            let end = ends.get(&partition).copied().unwrap_or(0);
            vec![partition.to_string(), with_commas(end), "0".to_string()]
        })
        .collect();
    let shown = browser.wait(
        "every lag at 0 at the committed end",
        &format!(
            "JSON.stringify({PARTITION_ROWS}) === '{}' && {PARTITION_ROWS}",
            serde_json::to_string(&expected).unwrap()
        ),
        60,
    );
    assert_eq!(shown, json!(expected));
    browser.screenshot("6-caught-up");
    // The window alone: the picture in the README (docs/status-page.png).
    browser.screenshot_of("7-window", false);
}
