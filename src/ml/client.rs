//! The ML API client: batching, retries with backoff, the circuit breaker,
//! bisection of rejected batches, and the per-record checks of guarantee 4.
//!
//! Shared by the PredictClient actor (new records) and the Backfill actor
//! (stored transactions without a prediction). It never fails as a whole: it
//! returns, for each requested transaction, a prediction or a failure, and
//! which failures were the API's rather than the record's.
//!
//! - 422 and other 4xx: the batch is split until the refused records stand alone.
//! - 5xx: retried; when retries run out, the batch is split the same way
//!   as long as one half is answered, and the record it fails on is that
//!   record's failure, not counted against the API. A lone record is its
//!   own fault only if the API answers an empty request right after.
//! - 401, 403, 404: a configuration error. Not retried, not split; counted
//!   by the breaker, logged naming the URL, and counted in a metric.

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use recloser::AsyncRecloser;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

use super::answer_body::{Body, ERROR_BODY_MAX_BYTES, quoted, read_bounded, truncate};
use super::request_slots::RequestSlots;
use crate::config::PredictConfig;
use crate::domain::concurrency::RequestOutcome;
use crate::domain::dead_letter::{ErrorType, Failure, Stage};
use crate::domain::prediction::{AnswerRules, PredictRequestItem, Prediction, check_answer};
use crate::domain::retry::{StatusClass, classify_status};
use crate::observability::metrics::{self, METRICS, Phase, StageTimer};

/// The outcome of predicting a set of transactions.
#[derive(Debug, Default)]
pub struct Predicted {
    pub predictions: Vec<Prediction>,
    pub failures: Vec<(Uuid, Failure)>,
    /// The failed ids that are not at fault: the API was unreachable, down
    /// for everyone, refused txnflow itself (401, 403, 404) or the breaker
    /// was open. The backfill does not count these attempts against them.
    pub unavailable: HashSet<Uuid>,
}

/// Why one HTTP call did not give an answer.
#[derive(Debug)]
enum CallError {
    /// A connect error, an unreadable or oversized answer: worth retrying.
    Retriable(String),
    /// A 5xx, 408, 429 or a timeout, with its reason: worth retrying, and,
    /// while other requests are answered, a sign that something in this
    /// request breaks or stalls the server: the batch is split to find it.
    ServerError(String),
    /// 401, 403 or 404: txnflow's configuration, not the records.
    Misconfigured { status: u16 },
    /// Any other 4xx: this request will never be accepted as it is.
    Rejected { status: u16, body: String },
}

/// What a request came to after its retries.
enum Attempted {
    Answered {
        body: Vec<u8>,
        attempts: u32,
    },
    Rejected {
        status: u16,
        body: String,
        attempts: u32,
    },
    /// Retries exhausted; `server_error` when the API answered a 5xx last.
    GaveUp {
        reason: String,
        attempts: u32,
        server_error: bool,
    },
    Misconfigured {
        status: u16,
    },
    BreakerOpen,
}

/// How a request is treated while a batch is split to find a record the
/// server fails on: a 5xx is then the record's answer, as a 422 would be:
/// not retried, and not counted against the API by the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolating {
    No,
    Yes,
}

pub struct MlClient {
    http: reqwest::Client,
    url: String,
    /// The URL as trace spans name it: no credentials, no query; and its
    /// host and port.
    traced_url: (String, String, u16),
    /// Whether this is the pipeline's client, whose breaker state
    /// `crate::ml::breaker::state` reports.
    reported: bool,
    breaker: AsyncRecloser,
    config: PredictConfig,
    categories: HashSet<String>,
    /// Bounds the requests in flight across every caller: to
    /// `concurrency`, or to less while the API is overloaded or slow.
    slots: RequestSlots,
}

impl MlClient {
    pub fn new(config: &PredictConfig, breaker: AsyncRecloser) -> anyhow::Result<MlClient> {
        MlClient::build(config, breaker, true)
    }

    /// A client of another model (a shadow or re-prediction API): its own
    /// breaker and request slots, and the pipeline's concurrency metric
    /// left alone.
    pub fn other_model(config: &PredictConfig, breaker: AsyncRecloser) -> anyhow::Result<MlClient> {
        MlClient::build(config, breaker, false)
    }

    fn build(config: &PredictConfig, breaker: AsyncRecloser, reported: bool) -> anyhow::Result<MlClient> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(config.concurrency)
            .build()?;
        let url = format!("{}/predict", config.url.trim_end_matches('/'));
        let traced_url = match reqwest::Url::parse(&url) {
            Ok(mut parsed) => {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
                parsed.set_query(None);
                parsed.set_fragment(None);
                let host = parsed.host_str().unwrap_or_default().to_string();
                let port = parsed.port_or_known_default().unwrap_or_default();
                (parsed.to_string(), host, port)
            }
            Err(_) => (String::new(), String::new(), 0),
        };
        Ok(MlClient {
            http,
            url,
            traced_url,
            reported,
            breaker,
            categories: config.categories.iter().cloned().collect(),
            slots: RequestSlots::new(config.concurrency, config.adaptive_concurrency, reported),
            config: config.clone(),
        })
    }

    /// Whether the API answers a request without records (`[]`) right now:
    /// after it kept failing one record with 5xx, that tells the record's
    /// fault from an outage. Not counted by the breaker.
    async fn answers_without_it(&self) -> bool {
        let probe = self.http.post(&self.url).header("content-type", "application/json").body("[]").send().await;
        probe.is_ok_and(|response| response.status().is_success())
    }

    /// Predicts `items` in requests of `batch_size`, up to `concurrency` at once.
    pub async fn predict(&self, items: Vec<PredictRequestItem>, caller: &'static str) -> Predicted {
        self.predict_at_most(items, caller, self.config.concurrency).await
    }

    /// The same, holding at most `requests` of the client's slots: a
    /// caller's share, so that the others keep the rest.
    pub async fn predict_at_most(
        &self,
        items: Vec<PredictRequestItem>,
        caller: &'static str,
        requests: usize,
    ) -> Predicted {
        let chunks: Vec<Vec<PredictRequestItem>> =
            items.chunks(self.config.batch_size).map(<[PredictRequestItem]>::to_vec).collect();
        let outcomes: Vec<Predicted> = futures_util::stream::iter(chunks)
            .map(|chunk| self.predict_chunk(chunk, caller, Isolating::No))
            .buffer_unordered(requests.clamp(1, self.config.concurrency))
            .collect()
            .await;
        let mut all = Predicted::default();
        for outcome in outcomes {
            all.merge(outcome);
        }
        all
    }

    /// One request, split in halves when the API rejects it, so that only
    /// the records it refuses fail (guarantee 3).
    fn predict_chunk<'a>(
        &'a self,
        items: Vec<PredictRequestItem>,
        caller: &'static str,
        isolating: Isolating,
    ) -> BoxFuture<'a, Predicted> {
        Box::pin(async move {
            let attempted = self.call_with_retries(&items, caller, isolating).await;
            self.resolve(items, attempted, caller).await
        })
    }

    /// What a request's outcome means for each of its records.
    fn resolve<'a>(
        &'a self,
        items: Vec<PredictRequestItem>,
        attempted: Attempted,
        caller: &'static str,
    ) -> BoxFuture<'a, Predicted> {
        Box::pin(async move {
            let ids: Vec<Uuid> = items.iter().map(|item| item.id).collect();
            let unavailable = |reason: String, attempts: u32| Predicted {
                failures: ids.iter().map(|id| (*id, prediction_failed(reason.clone(), attempts))).collect(),
                unavailable: ids.iter().copied().collect(),
                ..Predicted::default()
            };
            let own_failure = |reason: String, attempts: u32| Predicted {
                failures: vec![(ids[0], prediction_failed(reason, attempts))],
                ..Predicted::default()
            };
            match attempted {
                Attempted::Answered { body, attempts } => {
                    let rules = AnswerRules {
                        categories: &self.categories,
                        default_model_version: &self.config.default_model_version,
                    };
                    let checked = check_answer(&ids, &body, &rules);
                    if checked.unattributed > 0 {
                        tracing::warn!(
                            unattributed = checked.unattributed,
                            "ML API answered items that were not asked for"
                        );
                    }
                    Predicted {
                        predictions: checked.predicted,
                        failures: checked
                            .failed
                            .into_iter()
                            .map(|(id, reason)| (id, prediction_failed(reason, attempts)))
                            .collect(),
                        ..Predicted::default()
                    }
                }
                Attempted::Rejected { status, body, attempts } if items.len() == 1 => {
                    own_failure(format!("rejected by the ML API ({status}): {}", truncate(&body, 500)), attempts)
                }
                Attempted::Rejected { .. } => {
                    let mut items = items;
                    let second = items.split_off(items.len() / 2);
                    // One half after the other: a split holds the one request
                    // its batch had, so a caller's share of the slots (a
                    // re-prediction's `repredict.max_share`) holds across splits.
                    let left = self.predict_chunk(items, caller, Isolating::Yes).await;
                    let right = self.predict_chunk(second, caller, Isolating::Yes).await;
                    let mut both = left;
                    both.merge(right);
                    both
                }
                Attempted::GaveUp { server_error: true, .. } if items.len() > 1 => {
                    self.isolate_server_error(items, caller).await
                }
                Attempted::GaveUp { reason, attempts, server_error: true } => {
                    if self.answers_without_it().await {
                        own_failure(
                            format!("the ML API fails on this record while it answers others: {reason}"),
                            attempts,
                        )
                    } else {
                        unavailable(reason, attempts)
                    }
                }
                Attempted::GaveUp { reason, attempts, .. } => unavailable(reason, attempts),
                Attempted::Misconfigured { status } => {
                    unavailable(format!("the ML API answered {status}: check predict.url and its credentials"), 1)
                }
                Attempted::BreakerOpen => unavailable("circuit breaker open".into(), 0),
            }
        })
    }

    /// A batch the API kept failing with 5xx: each half is tried once. When
    /// both fail too, the API fails everything and no record is at fault;
    /// when one is answered, the other holds what breaks the server, and is
    /// split again until that record stands alone. Those tries are not
    /// counted against the API by the breaker.
    fn isolate_server_error<'a>(
        &'a self,
        mut items: Vec<PredictRequestItem>,
        caller: &'static str,
    ) -> BoxFuture<'a, Predicted> {
        Box::pin(async move {
            let second = items.split_off(items.len() / 2);
            // One half after the other, as for a refused batch.
            let left = self.call_with_retries(&items, caller, Isolating::Yes).await;
            let right = self.call_with_retries(&second, caller, Isolating::Yes).await;
            let fails = |attempted: &Attempted| matches!(attempted, Attempted::GaveUp { server_error: true, .. });
            let mut all = Predicted::default();
            if fails(&left) && fails(&right) {
                let reason = "the ML API failed every part of the batch (5xx, 408, 429 or no answer)".to_string();
                for item in items.iter().chain(&second) {
                    all.failures.push((item.id, prediction_failed(reason.clone(), 1)));
                    all.unavailable.insert(item.id);
                }
                return all;
            }
            for (half, attempted) in [(items, left), (second, right)] {
                let outcome = match attempted {
                    Attempted::GaveUp { reason, attempts, server_error: true } if half.len() == 1 => Predicted {
                        failures: vec![(
                            half[0].id,
                            prediction_failed(
                                format!("the ML API fails on this record while it answers others: {reason}"),
                                attempts,
                            ),
                        )],
                        ..Predicted::default()
                    },
                    Attempted::GaveUp { server_error: true, .. } => self.isolate_server_error(half, caller).await,
                    other => self.resolve(half, other, caller).await,
                };
                all.merge(outcome);
            }
            all
        })
    }

    async fn call_with_retries(
        &self,
        items: &[PredictRequestItem],
        caller: &'static str,
        isolating: Isolating,
    ) -> Attempted {
        let body = match serde_json::to_vec(items) {
            Ok(body) => body,
            Err(error) => {
                return Attempted::GaveUp {
                    reason: format!("cannot encode the request: {error}"),
                    attempts: 0,
                    server_error: false,
                };
            }
        };
        let waiting = Instant::now();
        let _slot = self.slots.acquire().await;
        metrics::Stage::MlApi.observe(Phase::Wait, waiting.elapsed());
        let _working = StageTimer::start(metrics::Stage::MlApi, Phase::Work);
        METRICS.ml_api_batch_size.with_label_values(&[caller]).observe(items.len() as f64);
        let mut attempts = 0;
        let mut backoff = crate::domain::backoff::Backoff::new(
            Duration::from_millis(self.config.retry_initial_backoff_ms),
            Duration::from_millis(self.config.retry_max_backoff_ms),
        );
        loop {
            attempts += 1;
            // What counts against the API: a 4xx means this request is bad,
            // not that the API is down; a 401, 403 or 404 means txnflow
            // cannot use it at all, so it counts. While a batch is split
            // to isolate a record, that record's 5xx is its own.
            let against_the_api = |error: &CallError| match error {
                CallError::Retriable(_) | CallError::Misconfigured { .. } => true,
                CallError::ServerError(_) => isolating == Isolating::No,
                CallError::Rejected { .. } => false,
            };
            let call = self.breaker.call_with(against_the_api, self.call(body.clone(), attempts, items.len()));
            let started = Instant::now();
            let result = call.await;
            match &result {
                Ok(_) | Err(recloser::Error::Inner(CallError::Rejected { .. } | CallError::Misconfigured { .. })) => {
                    self.slots.record(RequestOutcome::Answered(started.elapsed()));
                }
                // A record's own 5xx, met while isolating it, says nothing of the load.
                Err(recloser::Error::Inner(CallError::ServerError(_))) if isolating == Isolating::Yes => {}
                Err(recloser::Error::Inner(CallError::ServerError(_) | CallError::Retriable(_))) => {
                    self.slots.record(RequestOutcome::Overloaded);
                }
                Err(recloser::Error::Rejected) => {}
            }
            let (reason, server_error) = match result {
                Ok(answer) => return Attempted::Answered { body: answer, attempts },
                Err(recloser::Error::Rejected) => return Attempted::BreakerOpen,
                Err(recloser::Error::Inner(CallError::Rejected { status, body })) => {
                    return Attempted::Rejected { status, body, attempts };
                }
                Err(recloser::Error::Inner(CallError::Misconfigured { status })) => {
                    METRICS.ml_api_config_errors.with_label_values(&[&status.to_string()]).inc();
                    tracing::error!(
                        status,
                        // Without user info or query: the URL may hold a secret.
                        url = self.traced_url.0,
                        "the ML API refuses txnflow: check predict.url and its credentials; \
                         records are stored without predictions until it is fixed"
                    );
                    return Attempted::Misconfigured { status };
                }
                Err(recloser::Error::Inner(CallError::ServerError(reason))) => {
                    if isolating == Isolating::Yes {
                        return Attempted::GaveUp { reason, attempts, server_error: true };
                    }
                    (reason, true)
                }
                Err(recloser::Error::Inner(CallError::Retriable(reason))) => (reason, false),
            };
            if attempts > self.config.max_retries {
                return Attempted::GaveUp {
                    reason: format!("ML API failed after {attempts} attempts: {reason}"),
                    attempts,
                    server_error,
                };
            }
            let (attempts, delay) = backoff.next_attempt();
            tracing::debug!(attempts, ?delay, reason, "retrying the ML API");
            tokio::time::sleep(delay).await;
        }
    }

    /// One request: `attempt` of a batch of `batch_size` records, traced
    /// as a child of the current context's span.
    async fn call(&self, body: Vec<u8>, attempt: u32, batch_size: usize) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let (url, host, port) = &self.traced_url;
        let span = crate::observability::spans::MlCall::start(&crate::observability::spans::MlRequest {
            url,
            server: (host, *port),
            attempt,
            batch_size,
            breaker: self.reported.then(|| crate::ml::breaker::state().as_str()),
        });
        let mut request = self.http.post(&self.url).header("content-type", "application/json");
        if let Some(traceparent) = span.traceparent() {
            request = request.header(crate::domain::trace_context::TRACEPARENT, traceparent);
        }
        let result = request.body(body).send().await;
        let mut answered = None;
        let outcome = match result {
            // reqwest's error quotes the URL whole, user info included.
            Err(error) if error.is_timeout() => {
                Err(CallError::ServerError(format!("no answer within predict.timeout_ms: {}", error.without_url())))
            }
            Err(error) => Err(CallError::Retriable(format!("request failed: {}", error.without_url()))),
            Ok(response) => {
                let status = response.status().as_u16();
                answered = Some(status);
                let class = classify_status(status);
                // An error answer is only ever quoted: its first KiB is enough.
                let bound = match class {
                    StatusClass::Success => self.config.max_response_bytes,
                    _ => ERROR_BODY_MAX_BYTES,
                };
                match (class, read_bounded(response, bound).await) {
                    (StatusClass::Success, Ok(Body::Whole(bytes))) => Ok(bytes),
                    (StatusClass::Success, Ok(Body::Cut(_))) => Err(CallError::Retriable(format!(
                        "an answer over predict.max_response_bytes ({} bytes); the rest was not read",
                        self.config.max_response_bytes
                    ))),
                    (StatusClass::Success, Err(error)) => {
                        Err(CallError::Retriable(format!("reading the answer: {}", error.without_url())))
                    }
                    // 5xx, 408 and 429 alike.
                    (StatusClass::Retriable, body) => {
                        Err(CallError::ServerError(format!("status {status}: {}", truncate(&quoted(body), 200))))
                    }
                    (StatusClass::Misconfigured, _) => Err(CallError::Misconfigured { status }),
                    (StatusClass::Rejected, body) => Err(CallError::Rejected { status, body: quoted(body) }),
                }
            }
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(CallError::Retriable(_) | CallError::ServerError(_)) => "retriable",
            Err(CallError::Misconfigured { .. }) => "misconfigured",
            Err(CallError::Rejected { .. }) => "rejected",
        };
        span.end(answered, (label != "ok").then_some(label));
        METRICS.ml_api_latency.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        outcome
    }
}

impl Predicted {
    fn merge(&mut self, other: Predicted) {
        self.predictions.extend(other.predictions);
        self.failures.extend(other.failures);
        self.unavailable.extend(other.unavailable);
    }
}

fn prediction_failed(message: String, attempts: u32) -> Failure {
    Failure { error_type: ErrorType::PredictionFailed, stage: Stage::Predict, message, attempts }
}
