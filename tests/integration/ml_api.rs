//! The reference ML API, over real HTTP.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::helpers::{ChildGuard, free_port, no_faults, spawn_ml_api, txnflow};
use txnflow::domain::categories::{CATEGORIES, CPYTHON_VECTORS, REFERENCE_MODEL_VERSION, reference_category};

fn item(id: &str) -> Value {
    json!({"id": id, "description": "Purchase at Fnac", "amount": -12.5, "timestamp": "2026-01-11T10:00:00",
           "merchant": null, "operation_type": "payment", "side": "debit"})
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, String) {
    let response = reqwest::Client::new().post(format!("{base}{path}")).json(body).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn answers_the_cpython_categories_byte_for_byte() {
    let base = format!("http://{}", spawn_ml_api(no_faults()));
    let request: Vec<Value> = CPYTHON_VECTORS.iter().map(|(id, _)| item(id)).collect();
    let (status, body) = post(&base, "/predict", &Value::Array(request)).await;
    assert_eq!(status, 200);
    // FastAPI renders compact JSON with keys in model order.
    let expected: Vec<String> = CPYTHON_VECTORS
        .iter()
        .map(|(id, category)| format!(r#"{{"transaction_id":"{id}","category":"{category}"}}"#))
        .collect();
    assert_eq!(body, format!("[{}]", expected.join(",")));
    assert!(body.contains(r#""b9fa6684-502b-4695-8f92-247432ba610d","category":"Transportation""#));
}

#[tokio::test]
async fn any_invalid_item_fails_the_request_with_422_and_a_json_error() {
    let base = format!("http://{}", spawn_ml_api(no_faults()));
    let mut missing_merchant = item("00000000-0000-0000-0000-000000000002");
    missing_merchant.as_object_mut().unwrap().remove("merchant");
    let mut bad_amount = item("00000000-0000-0000-0000-000000000003");
    bad_amount["amount"] = json!("abc");
    let request =
        json!([item("00000000-0000-0000-0000-000000000001"), missing_merchant, bad_amount, item("not-a-uuid")]);
    let (status, body) = post(&base, "/predict", &request).await;
    assert_eq!(status, 422);
    let detail: Value = serde_json::from_str(&body).unwrap();
    let locations: Vec<Value> = detail["detail"].as_array().unwrap().iter().map(|e| e["loc"].clone()).collect();
    assert_eq!(locations, [json!(["body", 1, "merchant"]), json!(["body", 2, "amount"]), json!(["body", 3, "id"])]);

    let (status, _) = post(&base, "/predict", &json!({"not": "a list"})).await;
    assert_eq!(status, 422);
    let (status, body) = post(&base, "/predict", &json!([])).await;
    assert_eq!((status, body.as_str()), (200, "[]"));
}

#[tokio::test]
async fn fault_knobs_change_at_runtime() {
    let base = format!("http://{}", spawn_ml_api(no_faults()));
    let id = "b9fa6684-502b-4695-8f92-247432ba610d";
    let request = json!([item(id)]);

    let (status, _) = post(&base, "/faults", &json!({"error_rate": 1.0})).await;
    assert_eq!(status, 200);
    assert_eq!(post(&base, "/predict", &request).await.0, 500);

    post(&base, "/faults", &json!({"error_rate": 0.0, "malformed_rate": 1.0})).await;
    let (status, body) = post(&base, "/predict", &request).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).is_err(), "a malformed answer: {body}");

    post(&base, "/faults", &json!({"malformed_rate": 0.0, "drop_rate": 1.0})).await;
    assert_eq!(post(&base, "/predict", &request).await, (200, "[]".to_string()));

    post(&base, "/faults", &json!({"drop_rate": 0.0, "latency_ms": 300, "extended": true})).await;
    let started = Instant::now();
    let (status, body) = post(&base, "/predict", &request).await;
    assert!(started.elapsed() >= Duration::from_millis(300), "the added latency is a lower bound");
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer[0]["category"], "Transportation");
    assert_eq!(answer[0]["model_version"], REFERENCE_MODEL_VERSION);
    let confidence = answer[0]["confidence_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&confidence));

    let current: Value = reqwest::get(format!("{base}/faults")).await.unwrap().json().await.unwrap();
    assert_eq!(
        current,
        json!({"error_rate": 0.0, "latency_ms": 300, "malformed_rate": 0.0, "drop_rate": 0.0, "extended": true,
               "poison_marker": "", "marker_status": 422, "marker_body": "", "marker_latency_ms": 0, "refuse_rate": 0.0, "model_version": "",
               "max_concurrent": 0, "shift": 0, "endless_body": false})
    );
    assert_eq!(post(&base, "/faults", &json!({"error_rate": 2.0})).await.0, 422, "an out-of-range knob is refused");
    post(&base, "/faults", &json!({"latency_ms": 0, "poison_marker": "POISON"})).await;
    let mut poison = item("00000000-0000-0000-0000-000000000009");
    poison["description"] = json!("a POISON record");
    assert_eq!(post(&base, "/predict", &json!([item(id), poison])).await.0, 422, "a poison item fails its batch");
    assert_eq!(post(&base, "/predict", &request).await.0, 200, "a batch without it passes");
    assert_eq!(post(&base, "/faults", &json!({"eror_rate": 0.1})).await.0, 400, "an unknown knob is refused");
}

#[tokio::test]
async fn partial_drops_leave_out_some_items_only() {
    let base = format!("http://{}", spawn_ml_api(txnflow::ml::reference_api::Faults { drop_rate: 0.5, ..no_faults() }));
    let ids: Vec<Uuid> = (1..=200u128).map(Uuid::from_u128).collect();
    let request: Vec<Value> = ids.iter().map(|id| item(&id.to_string())).collect();
    let (status, body) = post(&base, "/predict", &Value::Array(request)).await;
    assert_eq!(status, 200);
    let answer: Vec<Value> = serde_json::from_str(&body).unwrap();
    // Each item is dropped with probability 1/2: all 200 or none would be a broken knob.
    assert!(!answer.is_empty() && answer.len() < 200, "{} items answered", answer.len());
    for item in answer {
        let id = Uuid::parse_str(item["transaction_id"].as_str().unwrap()).unwrap();
        assert!(ids.contains(&id));
        assert_eq!(item["category"], reference_category(id));
    }
}

/// `txnflow ml-api` on a free port with `flags`, once it answers
/// `/health`: the process (killed on drop), its base url, and that answer.
async fn spawn_ml_api_command(flags: &[&str]) -> (ChildGuard, String, Option<Value>) {
    spawn_ml_api_command_on(free_port(), flags).await
}

/// The same on `port`.
pub async fn spawn_ml_api_command_on(port: u16, flags: &[&str]) -> (ChildGuard, String, Option<Value>) {
    let child = ChildGuard(
        txnflow()
            .args(["ml-api", "--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(response) = client.get(format!("{base}/health")).send().await {
            let health = response.json::<Value>().await.ok();
            return (child, base, health);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, base, None)
}

/// The binary's flags set the knobs at start; /health answers.
#[tokio::test]
async fn the_command_takes_fault_flags_at_start() {
    let (_child, base, health) = spawn_ml_api_command(&["--error-rate", "1", "--latency-ms", "5", "--faults"]).await;
    let client = reqwest::Client::new();
    assert_eq!(health, Some(json!({"status": "ok", "model_version": REFERENCE_MODEL_VERSION})));
    let faults: Value = client.get(format!("{base}/faults")).send().await.unwrap().json().await.unwrap();
    assert_eq!(faults["error_rate"], 1.0);
    assert_eq!(faults["latency_ms"], 5);
    assert_eq!(post(&base, "/predict", &json!([item("b9fa6684-502b-4695-8f92-247432ba610d")])).await.0, 500);
}

/// Without `--faults`, the knobs cannot be read or turned from outside;
/// the start flags still apply, the new ones included.
#[tokio::test]
async fn the_faults_endpoint_is_absent_unless_asked_for() {
    let flags = ["--extended", "--model-version", "m-2026", "--poison-marker", "POISON", "--status-for-marker", "401"];
    let (_child, base, health) = spawn_ml_api_command(&flags).await;
    assert!(health.is_some(), "the server answers /health");
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{base}/faults")).send().await.unwrap().status().as_u16(), 404);
    assert_eq!(post(&base, "/faults", &json!({"error_rate": 1.0})).await.0, 404);
    let id = "b9fa6684-502b-4695-8f92-247432ba610d";
    let (status, body) = post(&base, "/predict", &json!([item(id)])).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer[0]["model_version"], "m-2026");
    let mut poison = item(id);
    poison["description"] = json!("POISON here");
    assert_eq!(post(&base, "/predict", &json!([item(id), poison])).await.0, 401, "--status-for-marker");
}

/// `--shift K --model-version V` is another model: every category index
/// moves by K (mod 15), the answers and /health name V, and /faults turns
/// the shift back at runtime.
#[tokio::test]
async fn a_shifted_model_moves_every_category_by_its_shift() {
    let flags = ["--extended", "--faults", "--model-version", "v2", "--shift", "3"];
    let (_child, base, health) = spawn_ml_api_command(&flags).await;
    assert_eq!(health, Some(json!({"status": "ok", "model_version": "v2"})));
    let request = Value::Array(CPYTHON_VECTORS.iter().map(|(id, _)| item(id)).collect());
    let answered = |body: String| -> Vec<(String, String, String)> {
        let answer: Vec<Value> = serde_json::from_str(&body).unwrap();
        answer
            .iter()
            .map(|a| {
                let field = |name: &str| a[name].as_str().unwrap().to_string();
                (field("transaction_id"), field("category"), field("model_version"))
            })
            .collect()
    };
    let (status, body) = post(&base, "/predict", &request).await;
    assert_eq!(status, 200);
    let shifted: Vec<(String, String, String)> = CPYTHON_VECTORS
        .iter()
        .map(|(id, category)| {
            let index = CATEGORIES.iter().position(|c| c == category).unwrap();
            (id.to_string(), CATEGORIES[(index + 3) % 15].to_string(), "v2".to_string())
        })
        .collect();
    assert_eq!(answered(body), shifted);

    assert_eq!(post(&base, "/faults", &json!({"shift": 0, "model_version": ""})).await.0, 200);
    let (_, body) = post(&base, "/predict", &request).await;
    let seed: Vec<(String, String, String)> = CPYTHON_VECTORS
        .iter()
        .map(|(id, category)| (id.to_string(), category.to_string(), REFERENCE_MODEL_VERSION.to_string()))
        .collect();
    assert_eq!(answered(body), seed, "shift 0 is the seed's model");
}

/// `refuse_rate` refuses the same ids on every request, and only them.
#[tokio::test]
async fn the_refuse_rate_refuses_the_same_ids_every_time() {
    let base =
        format!("http://{}", spawn_ml_api(txnflow::ml::reference_api::Faults { refuse_rate: 0.3, ..no_faults() }));
    let ids: Vec<Uuid> = (0..1_000).map(|i| Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("r{i}").as_bytes())).collect();
    let refused: Vec<Uuid> = ids.iter().copied().filter(|id| txnflow::ml::reference_api::refuses(*id, 0.3)).collect();
    assert!((250..350).contains(&refused.len()), "about 30% of ids: {}", refused.len());
    let accepted: Vec<Value> = ids.iter().filter(|id| !refused.contains(id)).map(|id| item(&id.to_string())).collect();
    let (status, body) = post(&base, "/predict", &Value::Array(accepted)).await;
    assert_eq!(status, 200, "{body}");
    for id in refused.iter().take(20) {
        assert_eq!(post(&base, "/predict", &json!([item(&id.to_string())])).await.0, 422, "{id}");
    }
}

/// `max_concurrent` makes requests wait their turn: with one worker and
/// 200 ms a turn, the last of 3 requests sent at once is answered after 3
/// turns at the earliest. Lower bounds only, which a slow machine meets.
#[tokio::test]
async fn a_model_with_few_workers_makes_requests_wait_their_turn() {
    let base = format!(
        "http://{}",
        spawn_ml_api(txnflow::ml::reference_api::Faults { latency_ms: 200, max_concurrent: 1, ..no_faults() })
    );
    let request = json!([item("b9fa6684-502b-4695-8f92-247432ba610d")]);
    let answered_after = |count: usize| {
        let (base, request) = (base.clone(), request.clone());
        async move {
            let started = Instant::now();
            let answers = futures_util::future::join_all((0..count).map(|_| post(&base, "/predict", &request))).await;
            assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
            started.elapsed()
        }
    };
    let took = answered_after(3).await;
    assert!(took >= Duration::from_millis(600), "3 turns of 200 ms one after another: {took:?}");

    let (status, body) = post(&base, "/faults", &json!({"max_concurrent": 2})).await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["max_concurrent"].clone()), (200, json!(2)));
    let took = answered_after(5).await;
    assert!(took >= Duration::from_millis(600), "5 requests on 2 workers take 3 turns: {took:?}");
}
