//! `txnflow ml-api`: the reference prediction server.
//!
//! It answers what the seed system's FastAPI server answered, byte for byte:
//! a compact JSON array of `{"transaction_id","category"}` with the category
//! given by CPython's UUID hash ([`crate::domain::categories`]). An invalid
//! item makes the whole request fail with 422, as pydantic validation did.
//!
//! Fault knobs make it misbehave on purpose for failure tests: errors, added
//! latency, malformed answers, dropped items, and a model that works on a
//! few requests at once (`max_concurrent`). `model_version` and `shift`
//! make it another model whose answers are known. They are set at start and
//! changed at runtime with `POST /faults`. `GET /load` says how many
//! requests it has in flight and the most it had at once.

use actix_web::{App, HttpResponse, HttpServer, web};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use uuid::Uuid;

use crate::domain::categories::{REFERENCE_MODEL_VERSION, reference_confidence, shifted_category};
use crate::domain::timestamp::parse_timestamp;

pub use crate::config::MlApiFaults as Faults;

/// Whether `refuse_rate` refuses `id`: a share of the id space, fixed per
/// id (its first 4 bytes as a fraction: random in v4 and v5 ids, unlike the
/// version and variant bits further on).
pub fn refuses(id: Uuid, refuse_rate: f64) -> bool {
    let high = (id.as_u128() >> 96) as u32;
    (f64::from(high) / f64::from(u32::MAX)) < refuse_rate
}

impl Faults {
    /// The model version this server answers as: `model_version`, or the
    /// reference model's when it is empty.
    fn answered_model_version(&self) -> &str {
        if self.model_version.is_empty() { REFERENCE_MODEL_VERSION } else { self.model_version.as_str() }
    }

    fn check(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("malformed_rate", self.malformed_rate),
            ("drop_rate", self.drop_rate),
            ("refuse_rate", self.refuse_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be in [0, 1], got {rate}"));
            }
        }
        if !(400..=599).contains(&self.marker_status) {
            return Err(format!("marker_status must be an error status (400 to 599), got {}", self.marker_status));
        }
        Ok(())
    }
}

/// A partial update of the knobs: `POST /faults {"error_rate": 0.5}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsUpdate {
    error_rate: Option<f64>,
    latency_ms: Option<u64>,
    malformed_rate: Option<f64>,
    drop_rate: Option<f64>,
    extended: Option<bool>,
    poison_marker: Option<String>,
    marker_status: Option<u16>,
    marker_body: Option<String>,
    marker_latency_ms: Option<u64>,
    refuse_rate: Option<f64>,
    model_version: Option<String>,
    max_concurrent: Option<u32>,
    shift: Option<u64>,
    endless_body: Option<bool>,
}

type SharedFaults = Arc<RwLock<Faults>>;

/// The model's workers under `max_concurrent`: none without a limit. A new
/// limit replaces the semaphore; requests holding the old one finish.
type ModelWorkers = Arc<RwLock<Option<Arc<tokio::sync::Semaphore>>>>;

fn model_workers(max_concurrent: u32) -> Option<Arc<tokio::sync::Semaphore>> {
    (max_concurrent > 0).then(|| Arc::new(tokio::sync::Semaphore::new(max_concurrent as usize)))
}

#[derive(Serialize)]
struct PredictionItem<'a> {
    transaction_id: Uuid,
    category: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    confidence_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
}

/// One validation error, in FastAPI's `{"detail": [...]}` shape.
#[derive(Serialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: &'static str,
    loc: (&'static str, usize, &'static str),
    msg: String,
}

/// Checks one request item as the seed's pydantic model did: every key
/// present, `merchant` may be null, types right, the timestamp a date-time.
fn check_item(
    index: usize,
    item: &serde_json::Value,
    poison_marker: &str,
    errors: &mut Vec<ErrorDetail>,
    poisoned: &mut bool,
) -> Option<Uuid> {
    use serde_json::Value;
    let mut error = |field: &'static str, kind: &'static str, msg: String| {
        errors.push(ErrorDetail { kind, loc: ("body", index, field), msg });
    };
    let Some(object) = item.as_object() else {
        error("item", "model_type", "Input should be an object".to_string());
        return None;
    };
    let mut id = None;
    for field in ["id", "description", "amount", "timestamp", "merchant", "operation_type", "side"] {
        match (field, object.get(field)) {
            (_, None) => error(field, "missing", "Field required".to_string()),
            ("id", Some(Value::String(text))) => match Uuid::try_parse(text) {
                Ok(parsed) => id = Some(parsed),
                Err(e) => error(field, "uuid_parsing", format!("Input should be a valid UUID, {e}")),
            },
            ("amount", Some(value)) if !value.is_number() => {
                error(field, "float_type", "Input should be a valid number".to_string())
            }
            ("timestamp", Some(Value::String(text))) if parse_timestamp(text).is_err() => {
                error(field, "datetime_from_date_parsing", "Input should be a valid datetime".to_string())
            }
            ("description", Some(Value::String(text))) if !poison_marker.is_empty() && text.contains(poison_marker) => {
                *poisoned = true;
                error(field, "value_error", format!("Value error, poison record (contains {poison_marker:?})"))
            }
            ("merchant", Some(Value::Null | Value::String(_))) => {}
            ("amount", Some(_)) | (_, Some(Value::String(_))) => {}
            (_, Some(_)) => error(field, "string_type", "Input should be a valid string".to_string()),
        }
    }
    id
}

/// The requests `POST /predict` has in flight, the most it had at once,
/// and how many it had in all, since the start or the last
/// `DELETE /load`: how a test sees the share of the model a client holds.
#[derive(Debug, Default)]
struct Load {
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    requests: AtomicU64,
}

/// One request in [`Load`]'s count, until it is dropped.
struct InFlight<'a>(&'a Load);

impl<'a> InFlight<'a> {
    fn start(load: &'a Load) -> InFlight<'a> {
        let now = load.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        load.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        load.requests.fetch_add(1, Ordering::SeqCst);
        InFlight(load)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn get_load(load: web::Data<Load>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "in_flight": load.in_flight.load(Ordering::SeqCst),
        "peak_in_flight": load.peak_in_flight.load(Ordering::SeqCst),
        "requests": load.requests.load(Ordering::SeqCst),
    }))
}

async fn reset_load(load: web::Data<Load>) -> HttpResponse {
    load.peak_in_flight.store(load.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    load.requests.store(0, Ordering::SeqCst);
    HttpResponse::NoContent().finish()
}

/// `POST /predict`, traced (when tracing is on) as a child of the
/// caller's `traceparent`.
async fn predict(
    request: actix_web::HttpRequest,
    body: web::Bytes,
    faults: web::Data<SharedFaults>,
    workers: web::Data<ModelWorkers>,
    load: web::Data<Load>,
) -> HttpResponse {
    let _in_flight = InFlight::start(&load);
    let traceparent = request.headers().get(crate::domain::trace_context::TRACEPARENT).map(|value| value.as_bytes());
    let span = crate::observability::spans::MlApiRequest::start(traceparent);
    let response = answer(body, faults, workers).await;
    span.end(response.status().as_u16());
    response
}

async fn answer(body: web::Bytes, faults: web::Data<SharedFaults>, workers: web::Data<ModelWorkers>) -> HttpResponse {
    let faults = faults.read().expect("faults lock").clone();
    let workers = workers.read().expect("workers lock").clone();
    // Held until the answer is built: the request's turn on the model.
    let _turn = match &workers {
        Some(workers) => workers.acquire().await.ok(),
        None => None,
    };
    if faults.latency_ms > 0 {
        actix_rt::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if faults.endless_body {
        // Spaces after an opening bracket: valid JSON so far, never ending.
        let opening = futures_util::stream::once(async { Ok::<_, actix_web::Error>(web::Bytes::from_static(b"[")) });
        let filler = futures_util::stream::repeat_with(|| Ok(web::Bytes::from_static(&[b' '; 64 * 1024])));
        return HttpResponse::Ok()
            .content_type("application/json")
            .streaming(futures_util::StreamExt::chain(opening, filler));
    }
    let mut rng = rand::rng();
    if rng.random_bool(faults.error_rate) {
        return HttpResponse::InternalServerError().json(serde_json::json!({"detail": "injected fault: error_rate"}));
    }
    let items: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(serde_json::Value::Array(items)) => items,
        Ok(_) => {
            return unprocessable(vec![ErrorDetail {
                kind: "list_type",
                loc: ("body", 0, "body"),
                msg: "Input should be a valid list".into(),
            }]);
        }
        Err(e) => {
            return unprocessable(vec![ErrorDetail {
                kind: "json_invalid",
                loc: ("body", 0, "body"),
                msg: format!("JSON decode error: {e}"),
            }]);
        }
    };
    let mut errors = Vec::new();
    let mut poisoned = false;
    let ids: Vec<Option<Uuid>> = items
        .iter()
        .enumerate()
        .map(|(index, item)| check_item(index, item, &faults.poison_marker, &mut errors, &mut poisoned))
        .collect();
    if faults.refuse_rate > 0.0 {
        for (index, id) in ids.iter().enumerate() {
            if id.is_some_and(|id| refuses(id, faults.refuse_rate)) {
                errors.push(ErrorDetail {
                    kind: "value_error",
                    loc: ("body", index, "id"),
                    msg: "Value error, refused (refuse_rate)".into(),
                });
            }
        }
    }
    if poisoned && faults.marker_latency_ms > 0 {
        actix_rt::time::sleep(Duration::from_millis(faults.marker_latency_ms)).await;
    }
    if poisoned && faults.marker_status != 422 {
        let status = actix_web::http::StatusCode::from_u16(faults.marker_status)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
        if !faults.marker_body.is_empty() {
            return HttpResponse::build(status).content_type("text/plain").body(faults.marker_body.clone());
        }
        return HttpResponse::build(status).json(serde_json::json!({"detail": "injected fault: poison marker"}));
    }
    if !errors.is_empty() {
        return unprocessable(errors);
    }
    if rng.random_bool(faults.malformed_rate) {
        // A cut-off answer, as from a proxy that dropped the connection.
        return HttpResponse::Ok().content_type("application/json").body("[{\"transaction_id\": \"");
    }
    let model_version = faults.answered_model_version();
    let answer: Vec<PredictionItem<'_>> = ids
        .into_iter()
        .flatten()
        .filter(|_| !rng.random_bool(faults.drop_rate))
        .map(|id| PredictionItem {
            transaction_id: id,
            category: shifted_category(id, faults.shift),
            confidence_score: faults.extended.then(|| reference_confidence(id)),
            model_version: faults.extended.then_some(model_version),
        })
        .collect();
    HttpResponse::Ok().json(answer)
}

fn unprocessable(detail: Vec<ErrorDetail>) -> HttpResponse {
    HttpResponse::UnprocessableEntity().json(serde_json::json!({ "detail": detail }))
}

async fn health(faults: web::Data<SharedFaults>) -> HttpResponse {
    let faults = faults.read().expect("faults lock");
    HttpResponse::Ok().json(serde_json::json!({"status": "ok", "model_version": faults.answered_model_version()}))
}

async fn get_faults(faults: web::Data<SharedFaults>) -> HttpResponse {
    HttpResponse::Ok().json(faults.read().expect("faults lock").clone())
}

async fn set_faults(
    update: web::Json<FaultsUpdate>,
    faults: web::Data<SharedFaults>,
    workers: web::Data<ModelWorkers>,
) -> HttpResponse {
    let mut current = faults.write().expect("faults lock");
    let next = Faults {
        error_rate: update.error_rate.unwrap_or(current.error_rate),
        latency_ms: update.latency_ms.unwrap_or(current.latency_ms),
        malformed_rate: update.malformed_rate.unwrap_or(current.malformed_rate),
        drop_rate: update.drop_rate.unwrap_or(current.drop_rate),
        extended: update.extended.unwrap_or(current.extended),
        poison_marker: update.poison_marker.clone().unwrap_or_else(|| current.poison_marker.clone()),
        marker_status: update.marker_status.unwrap_or(current.marker_status),
        marker_body: update.marker_body.clone().unwrap_or_else(|| current.marker_body.clone()),
        marker_latency_ms: update.marker_latency_ms.unwrap_or(current.marker_latency_ms),
        refuse_rate: update.refuse_rate.unwrap_or(current.refuse_rate),
        model_version: update.model_version.clone().unwrap_or_else(|| current.model_version.clone()),
        max_concurrent: update.max_concurrent.unwrap_or(current.max_concurrent),
        shift: update.shift.unwrap_or(current.shift),
        endless_body: update.endless_body.unwrap_or(current.endless_body),
    };
    if let Err(message) = next.check() {
        return HttpResponse::UnprocessableEntity().json(serde_json::json!({ "detail": message }));
    }
    tracing::info!(?next, "fault knobs changed");
    if next.max_concurrent != current.max_concurrent {
        *workers.write().expect("workers lock") = model_workers(next.max_concurrent);
    }
    *current = next.clone();
    HttpResponse::Ok().json(next)
}

/// A running server: its bound address (port 0 picks a free one) and handle.
pub struct RunningServer {
    pub address: SocketAddr,
    pub server: actix_web::dev::Server,
}

/// Whether `/faults` is served: only when asked (`--faults`), since
/// anyone who reaches it could make the server misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultsEndpoint {
    Served,
    Absent,
}

/// Binds and starts the server; `.server` resolves when it stops.
pub fn start(listen: SocketAddr, faults: Faults, endpoint: FaultsEndpoint) -> anyhow::Result<RunningServer> {
    faults.check().map_err(|message| anyhow::anyhow!(message))?;
    let workers: ModelWorkers = Arc::new(RwLock::new(model_workers(faults.max_concurrent)));
    let shared: SharedFaults = Arc::new(RwLock::new(faults));
    let load = web::Data::new(Load::default());
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(web::Data::new(shared.clone()))
            .app_data(load.clone())
            .app_data(web::Data::new(workers.clone()))
            .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
            .route("/predict", web::post().to(predict))
            .route("/health", web::get().to(health));
        match endpoint {
            FaultsEndpoint::Served => app
                .route("/faults", web::get().to(get_faults))
                .route("/faults", web::post().to(set_faults))
                .route("/load", web::get().to(get_load))
                .route("/load", web::delete().to(reset_load)),
            // actix answers 404 for a path without a route.
            FaultsEndpoint::Absent => app,
        }
    })
    .bind(listen)
    .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let address = *server.addrs().first().ok_or_else(|| anyhow::anyhow!("no address bound"))?;
    Ok(RunningServer { address, server: server.shutdown_timeout(5).run() })
}

/// Runs a server on a thread of its own (with its own actix system) and
/// returns its address once it listens. For tests and benchmarks, so
/// `/faults` is served.
pub fn spawn_in_thread(listen: SocketAddr, faults: Faults) -> anyhow::Result<SocketAddr> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("ml-api".into()).spawn(move || {
        actix_rt::System::new().block_on(async move {
            match start(listen, faults, FaultsEndpoint::Served) {
                Ok(running) => {
                    let _ = sender.send(Ok(running.address));
                    let _ = running.server.await;
                }
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
            }
        })
    })?;
    receiver.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow::anyhow!("the ML API did not start in 10 s"))?
}
