//! The admin HTTP server of `txnflow run`: the status page, health,
//! readiness, Prometheus metrics, batch and re-prediction runs, lookups
//! and, when `chaos.enabled`, the chaos hooks.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{App, HttpResponse, HttpServer, web};
use rdkafka::producer::Producer;
use std::sync::Arc;
use std::time::Duration;

use crate::actors::ActorSystem;
use crate::actors::csv_loader::LoadCsv;
use crate::actors::messages::Chaos;
use crate::batch::BatchError;
use crate::observability::metrics::METRICS;

struct AdminState {
    system: Arc<ActorSystem>,
    chaos_enabled: bool,
    samples: Arc<super::status::Samples>,
}

/// The endpoints anyone may call: probes and scrapes carry no token, and
/// the status page's files hold no data (the page asks for the token and
/// sends it with each `GET /status.json`).
const OPEN_PATHS: [&str; 6] = ["/health", "/ready", "/metrics", "/", "/status.css", "/status.js"];

/// Whether `header` is `Bearer <token>`. Compared in constant time, so the
/// answer's timing tells nothing about how much of a guess was right.
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(presented) = header.and_then(|value| value.strip_prefix("Bearer ")) else { return false };
    let (presented, token) = (presented.trim().as_bytes(), token.as_bytes());
    presented.len() == token.len() && presented.iter().zip(token).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// Requires the bearer token on every endpoint but [`OPEN_PATHS`].
async fn require_token(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let token = request.app_data::<web::Data<AdminToken>>().map(|token| token.0.clone()).unwrap_or_default();
    let open = OPEN_PATHS.contains(&request.path());
    if token.is_empty() || open {
        return next.call(request).await.map(ServiceResponse::map_into_boxed_body);
    }
    let header = request.headers().get("authorization").and_then(|value| value.to_str().ok());
    if bearer_matches(header, &token) {
        return next.call(request).await.map(ServiceResponse::map_into_boxed_body);
    }
    let answer = HttpResponse::Unauthorized()
        .insert_header(("www-authenticate", "Bearer"))
        .json(serde_json::json!({"error": "this endpoint requires Authorization: Bearer <admin.token>"}));
    Ok(request.into_response(answer))
}

/// The configured token (empty: none).
struct AdminToken(String);

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Ready when the database and the broker both answer.
async fn ready(state: web::Data<AdminState>) -> HttpResponse {
    let pool = state.system.pool.clone();
    let database = tokio::task::spawn_blocking(move || {
        use diesel::RunQueryDsl;
        let mut connection = pool.get_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
        diesel::sql_query("SELECT 1").execute(&mut connection).map(|_| ()).map_err(|e| e.to_string())
    });
    let producer = state.system.producer.clone();
    let broker = tokio::task::spawn_blocking(move || {
        producer.client().fetch_metadata(None, Duration::from_secs(2)).map(|_| ()).map_err(|e| {
            // librdkafka's own last word says why (a TLS handshake refused, say).
            match crate::kafka::last_client_error(Duration::from_secs(30)) {
                Some(last) => format!("{last} (metadata: {e})"),
                None => e.to_string(),
            }
        })
    });
    let (database, broker) = tokio::join!(database, broker);
    // A short reason, secrets hidden: the answer says which dependency failed.
    let database = database.unwrap_or_else(|e| Err(e.to_string())).map_err(crate::domain::redaction::short_reason);
    let broker = broker.unwrap_or_else(|e| Err(e.to_string())).map_err(crate::domain::redaction::short_reason);
    let body = serde_json::json!({
        "database": database.as_ref().err().map_or("ok".to_string(), |e| e.clone()),
        "broker": broker.as_ref().err().map_or("ok".to_string(), |e| e.clone()),
    });
    if database.is_ok() && broker.is_ok() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    METRICS.in_flight.set(state.system.capacity.in_flight() as i64);
    METRICS.in_flight_bytes.set(state.system.capacity.in_flight_bytes() as i64);
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(METRICS.render())
}

/// The status page's files, from the binary.
async fn page_file(request: actix_web::HttpRequest) -> HttpResponse {
    use super::status::{PAGE_CSS, PAGE_HTML, PAGE_JS, PAGE_POLICY};
    let (content_type, body) = match request.path() {
        "/status.css" => ("text/css; charset=utf-8", PAGE_CSS),
        "/status.js" => ("text/javascript; charset=utf-8", PAGE_JS),
        _ => ("text/html; charset=utf-8", PAGE_HTML),
    };
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("content-security-policy", PAGE_POLICY))
        .insert_header(("x-content-type-options", "nosniff"))
        .insert_header(("cache-control", "no-cache"))
        .body(body)
}

/// `GET /status.json`: what the status page shows (see [`super::status::snapshot`]).
async fn status_json(state: web::Data<AdminState>) -> HttpResponse {
    let answer = super::status::snapshot(&state.system, &state.samples).await;
    HttpResponse::Ok().insert_header(("cache-control", "no-store")).json(answer)
}

async fn chaos(path: web::Path<(String, String)>, state: web::Data<AdminState>) -> HttpResponse {
    if !state.chaos_enabled {
        return HttpResponse::NotFound()
            .json(serde_json::json!({"error": "chaos is disabled (chaos.enabled = false)"}));
    }
    let (actor, kind) = path.into_inner();
    let chaos = match kind.as_str() {
        "crash" => Chaos::Crash,
        "panic" => Chaos::Panic,
        _ => return HttpResponse::NotFound().json(serde_json::json!({"error": format!("unknown chaos {kind:?}")})),
    };
    let sent = state.system.chaos(&actor, chaos);
    if sent {
        HttpResponse::Accepted().json(serde_json::json!({"actor": actor, "chaos": kind}))
    } else {
        HttpResponse::NotFound().json(serde_json::json!({"error": format!("no running actor {actor:?}")}))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    uri: String,
    run_id: Option<String>,
}

/// `POST /batches {"uri", "run_id"?}`: checks the input, starts the run,
/// answers 202 with the run id; 400 names a bad input, 403 one outside
/// `batch.allowed_buckets` and `batch.local_roots`, 409 a run id in use,
/// 429 a run beyond `batch.max_concurrent_runs`.
async fn start_batch(request: web::Json<BatchRequest>, state: web::Data<AdminState>) -> HttpResponse {
    let BatchRequest { uri, run_id } = request.into_inner();
    let loader = state.system.csv_loader();
    let policy = crate::batch::InputPolicy::for_http(&state.system.config);
    match loader.send(LoadCsv { uri, run_id, policy }).await {
        Ok(Ok(run_id)) => {
            HttpResponse::Accepted().json(serde_json::json!({"run_id": run_id, "status": format!("/batches/{run_id}")}))
        }
        Ok(Err(error @ BatchError::AlreadyRunning(_))) => {
            HttpResponse::Conflict().json(serde_json::json!({"error": error.to_string()}))
        }
        Ok(Err(error @ BatchError::NotAllowed { .. })) => {
            HttpResponse::Forbidden().json(serde_json::json!({"error": error.to_string()}))
        }
        Ok(Err(error @ BatchError::TooManyRuns(_))) => {
            HttpResponse::TooManyRequests().json(serde_json::json!({"error": error.to_string()}))
        }
        Ok(Err(error)) => HttpResponse::BadRequest().json(serde_json::json!({"error": error.to_string()})),
        Err(error) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": format!("the CsvLoader is restarting: {error}")})),
    }
}

/// `GET /batches/<run_id>`: the run's status, counts and error files, with
/// the `instance` running it. A run of this process is answered from
/// memory (live counts); any other from the `batch_runs` table, so every
/// replica answers for every run, and a run whose process stopped
/// reporting shows as `interrupted`.
async fn batch_status(run_id: web::Path<String>, state: web::Data<AdminState>) -> HttpResponse {
    let system = state.system.clone();
    let local = system.runs.report(&run_id).map(|report| {
        let mut answer = serde_json::to_value(report).expect("a report serialises");
        answer["instance"] = system.instance.clone().into();
        answer
    });
    let pool = system.pool.clone();
    let id = run_id.clone();
    let recorded = web::block(move || {
        let mut connection = pool.get().map_err(|e| e.to_string())?;
        crate::db::recorded_run(&mut connection, &id).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|error| Err(error.to_string()));
    let from_table = |row: crate::db::RecordedRun| {
        let stale_after = system.config.batch.stale_after_ms;
        HttpResponse::Ok().json(crate::batch::recorded_answer(&row.report, &row.instance, row.age_ms, stale_after))
    };
    match (local, recorded) {
        // Another process ran it since: its report is the newer one.
        (Some(_), Ok(Some(row))) if row.instance != system.instance => from_table(row),
        (Some(answer), _) => HttpResponse::Ok().json(answer),
        (None, Ok(Some(row))) => from_table(row),
        (None, Ok(None)) => {
            HttpResponse::NotFound().json(serde_json::json!({"error": format!("no batch run {:?}", run_id.as_str())}))
        }
        (None, Err(error)) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": format!("cannot read the batch_runs table: {error}")})),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RepredictRequest {
    run_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    from_model: Option<String>,
}

/// `POST /repredictions {"run_id"?, "since"?, "until"?, "from_model"?}`:
/// starts or resumes a re-prediction run here, and answers 202 with its id;
/// 200 with its record when that run id completed before; 400 names a bad
/// option, 409 a run id running elsewhere or given another selection, 429
/// a run beyond `repredict.max_concurrent_runs`.
async fn start_repredict(request: web::Json<RepredictRequest>, state: web::Data<AdminState>) -> HttpResponse {
    use crate::actors::repredictor::engine::StartError;
    use crate::actors::repredictor::{StartRefused, StartRepredict, Started};
    let request = request.into_inner();
    let selection = match crate::domain::rollout::Selection::parse(
        request.since.as_deref(),
        request.until.as_deref(),
        request.from_model.as_deref(),
    ) {
        Ok(selection) => selection,
        Err(reason) => return HttpResponse::BadRequest().json(serde_json::json!({"error": reason})),
    };
    if let Some(run_id) = &request.run_id
        && (run_id.is_empty() || run_id.len() > 200 || run_id.chars().any(char::is_control))
    {
        return HttpResponse::BadRequest()
            .json(serde_json::json!({"error": "run_id: 1 to 200 characters, no control characters"}));
    }
    let error = |status: actix_web::http::StatusCode, error: &dyn std::fmt::Display| {
        HttpResponse::build(status).json(serde_json::json!({"error": error.to_string()}))
    };
    use actix_web::http::StatusCode;
    match state.system.repredictor().send(StartRepredict { run_id: request.run_id, selection }).await {
        Ok(Ok(Started::Running(run_id))) => HttpResponse::Accepted()
            .json(serde_json::json!({"run_id": run_id, "status": format!("/repredictions/{run_id}")})),
        Ok(Ok(Started::Completed(run))) => HttpResponse::Ok().json(run),
        Ok(Err(refused @ StartRefused::Start(StartError::Running(_) | StartError::OtherSelection(..)))) => {
            error(StatusCode::CONFLICT, &refused)
        }
        Ok(Err(refused @ StartRefused::TooMany(_))) => error(StatusCode::TOO_MANY_REQUESTS, &refused),
        Ok(Err(refused)) => error(StatusCode::SERVICE_UNAVAILABLE, &refused),
        Err(mailbox) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("the Repredictor is restarting: {mailbox}")),
    }
}

/// A re-prediction run's record as `GET /repredictions/<run_id>` answers
/// it: with its backlog, percent and time left, and `interrupted` when it
/// is recorded as running but no session holds it.
pub(super) fn repredict_answer(run: &crate::db::history::RepredictRun, held: bool) -> serde_json::Value {
    let mut answer = serde_json::to_value(run).expect("a run serialises");
    if run.status == "running" && !held {
        answer["status"] = "interrupted".into();
        answer["hint"] = "POST /repredictions with this run_id to resume it".into();
    }
    answer["backlog"] = run.backlog().into();
    // The rate so far, from the run's start to its last chunk.
    let done = (run.predicted + run.failed).max(0) as u64;
    let seconds = (run.updated_at - run.started_at).num_milliseconds() as f64 / 1000.0;
    let estimate = crate::domain::progress::estimate(done, run.selected.max(0) as u64, done, seconds);
    answer["percent"] = estimate.percent.into();
    answer["eta_seconds"] = match answer["status"].as_str() {
        Some("running") | Some("completed") => estimate.eta_seconds.into(),
        _ => serde_json::Value::Null,
    };
    answer
}

/// `GET /repredictions/<run_id>`: the run's record, from any replica;
/// a run recorded as running that no session holds is `interrupted`.
async fn repredict_status(run_id: web::Path<String>, state: web::Data<AdminState>) -> HttpResponse {
    let pool = state.system.pool.clone();
    let id = run_id.into_inner();
    let answer = crate::db::blocking(&pool, move |connection| {
        let Some(run) = crate::db::history::load_run(connection, &id)? else { return Ok(None) };
        let held = run.status == "running" && crate::db::history::run_is_held(connection, &id)?;
        Ok(Some((run, held)))
    })
    .await;
    match answer {
        Ok(Some((run, held))) => {
            let answer = repredict_answer(&run, held);
            HttpResponse::Ok().json(answer)
        }
        Ok(None) => HttpResponse::NotFound().json(serde_json::json!({"error": "no such re-prediction run"})),
        Err(error) => HttpResponse::ServiceUnavailable().json(
            serde_json::json!({"error": format!("cannot read repredict_runs: {}", crate::domain::redaction::short_reason(error))}),
        ),
    }
}

#[derive(serde::Deserialize)]
struct LookupQuery {
    limit: Option<i64>,
}

/// `GET /transactions/<id>/predictions`: every prediction of one
/// transaction, across versions and the archive, newest first (`?limit=`,
/// 100 by default, at most 1,000). The id is its UUID or its source id.
async fn transaction_predictions(
    id: web::Path<String>,
    query: web::Query<LookupQuery>,
    state: web::Data<AdminState>,
) -> HttpResponse {
    let transaction_id = match crate::domain::identity::lookup_id(&id) {
        Ok(transaction_id) => transaction_id,
        Err(reason) => return HttpResponse::BadRequest().json(serde_json::json!({"error": reason})),
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=crate::db::history::MAX_LOOKUP).contains(&limit) {
        let error = format!("limit must be between 1 and {}", crate::db::history::MAX_LOOKUP);
        return HttpResponse::BadRequest().json(serde_json::json!({"error": error}));
    }
    let pool = state.system.pool.clone();
    let found = crate::db::blocking(&pool, move |connection| {
        crate::db::history::transaction_predictions(connection, transaction_id, limit)
    })
    .await;
    match found {
        Ok(found) if !found.stored => HttpResponse::NotFound().json(found),
        Ok(found) => HttpResponse::Ok().json(found),
        Err(error) => HttpResponse::ServiceUnavailable().json(
            serde_json::json!({"error": format!("cannot read prediction_history: {}", crate::domain::redaction::short_reason(error))}),
        ),
    }
}

/// Binds and starts the admin server. A listen address beyond loopback
/// needs `admin.token` (see [`crate::config::AdminConfig::check_exposure`]).
pub fn start(
    admin: &crate::config::AdminConfig,
    system: Arc<ActorSystem>,
    chaos_enabled: bool,
) -> anyhow::Result<actix_web::dev::Server> {
    admin.check_exposure()?;
    let listen = admin.listen;
    let samples = Arc::new(super::status::Samples::default());
    actix_rt::spawn(super::status::sample_counters(samples.clone()));
    let state = web::Data::new(AdminState { system, chaos_enabled, samples });
    let token = web::Data::new(AdminToken(admin.token.clone()));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(token.clone())
            .wrap(actix_web::middleware::from_fn(require_token))
            .route("/", web::get().to(page_file))
            .route("/status.css", web::get().to(page_file))
            .route("/status.js", web::get().to(page_file))
            .route("/status.json", web::get().to(status_json))
            .route("/health", web::get().to(health))
            .route("/ready", web::get().to(ready))
            .route("/metrics", web::get().to(metrics))
            .route("/chaos/{actor}/{kind}", web::post().to(chaos))
            .route("/batches", web::post().to(start_batch))
            .route("/batches/{run_id}", web::get().to(batch_status))
            .route("/repredictions", web::post().to(start_repredict))
            .route("/repredictions/{run_id}", web::get().to(repredict_status))
            .route("/transactions/{id}/predictions", web::get().to(transaction_predictions))
    })
    .workers(1)
    .disable_signals()
    .bind(listen)
    .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (admin.listen): {e}"))?;
    Ok(server.run())
}
