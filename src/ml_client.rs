//! The ML API client: batching, retries with backoff, the circuit breaker,
//! bisection of rejected batches, and the per-record checks of guarantee 4.
//!
//! Shared by the PredictClient actor (new records) and the Backfill actor
//! (stored transactions without a prediction). It never fails as a whole: it
//! returns, for each requested transaction, a prediction or a failure.

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use rand::Rng;
use recloser::AsyncRecloser;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::config::PredictConfig;
use crate::domain::dead_letter::{ErrorType, Failure, Stage};
use crate::domain::prediction::{AnswerRules, PredictRequestItem, Prediction, check_answer};
use crate::domain::retry::{StatusClass, backoff_delay, classify_status};
use crate::metrics::METRICS;

/// The outcome of predicting a set of transactions.
#[derive(Debug, Default)]
pub struct Predicted {
    pub predictions: Vec<Prediction>,
    pub failures: Vec<(Uuid, Failure)>,
}

/// Why one HTTP call did not give an answer.
#[derive(Debug)]
enum CallError {
    /// Connect error, timeout, 408, 429 or 5xx: worth retrying.
    Retriable(String),
    /// Any other 4xx: this request will never be accepted as it is.
    Rejected { status: u16, body: String },
}

/// What a request came to after its retries.
enum Attempted {
    Answered { body: Vec<u8>, attempts: u32 },
    Rejected { status: u16, body: String, attempts: u32 },
    GaveUp { reason: String, attempts: u32 },
    BreakerOpen,
}

pub struct MlClient {
    http: reqwest::Client,
    url: String,
    breaker: AsyncRecloser,
    config: PredictConfig,
    categories: HashSet<String>,
    /// Bounds the requests in flight across every caller to `concurrency`.
    in_flight: Arc<Semaphore>,
}

impl MlClient {
    pub fn new(config: &PredictConfig, breaker: AsyncRecloser) -> anyhow::Result<MlClient> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(config.concurrency)
            .build()?;
        Ok(MlClient {
            http,
            url: format!("{}/predict", config.url.trim_end_matches('/')),
            breaker,
            categories: config.categories.iter().cloned().collect(),
            in_flight: Arc::new(Semaphore::new(config.concurrency)),
            config: config.clone(),
        })
    }

    /// Predicts `items` in requests of `batch_size`, up to `concurrency` at once.
    pub async fn predict(&self, items: Vec<PredictRequestItem>, caller: &'static str) -> Predicted {
        let chunks: Vec<Vec<PredictRequestItem>> =
            items.chunks(self.config.batch_size).map(<[PredictRequestItem]>::to_vec).collect();
        let outcomes: Vec<Predicted> = futures_util::stream::iter(chunks)
            .map(|chunk| self.predict_chunk(chunk, caller))
            .buffer_unordered(self.config.concurrency)
            .collect()
            .await;
        let mut all = Predicted::default();
        for outcome in outcomes {
            all.predictions.extend(outcome.predictions);
            all.failures.extend(outcome.failures);
        }
        all
    }

    /// One request, split in halves when the API rejects it, so that only
    /// the records it refuses fail (guarantee 3).
    fn predict_chunk<'a>(&'a self, items: Vec<PredictRequestItem>, caller: &'static str) -> BoxFuture<'a, Predicted> {
        Box::pin(async move {
            let ids: Vec<Uuid> = items.iter().map(|item| item.id).collect();
            match self.call_with_retries(&items, caller).await {
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
                    }
                }
                Attempted::Rejected { status, body, attempts } if items.len() == 1 => {
                    let reason = format!("rejected by the ML API ({status}): {}", truncate(&body, 500));
                    Predicted { failures: vec![(ids[0], prediction_failed(reason, attempts))], ..Predicted::default() }
                }
                Attempted::Rejected { .. } => {
                    let mut items = items;
                    let second = items.split_off(items.len() / 2);
                    let (left, right) =
                        tokio::join!(self.predict_chunk(items, caller), self.predict_chunk(second, caller));
                    let mut both = left;
                    both.predictions.extend(right.predictions);
                    both.failures.extend(right.failures);
                    both
                }
                Attempted::GaveUp { reason, attempts } => Predicted {
                    failures: ids.into_iter().map(|id| (id, prediction_failed(reason.clone(), attempts))).collect(),
                    ..Predicted::default()
                },
                Attempted::BreakerOpen => Predicted {
                    failures: ids
                        .into_iter()
                        .map(|id| (id, prediction_failed("circuit breaker open".into(), 0)))
                        .collect(),
                    ..Predicted::default()
                },
            }
        })
    }

    async fn call_with_retries(&self, items: &[PredictRequestItem], caller: &'static str) -> Attempted {
        let body = match serde_json::to_vec(items) {
            Ok(body) => body,
            Err(error) => {
                return Attempted::GaveUp { reason: format!("cannot encode the request: {error}"), attempts: 0 };
            }
        };
        let _permit = self.in_flight.acquire().await.expect("the semaphore is never closed");
        METRICS.ml_api_batch_size.with_label_values(&[caller]).observe(items.len() as f64);
        let mut attempts = 0;
        loop {
            attempts += 1;
            // Only retriable failures count against the API: a 4xx means
            // this request is bad, not that the API is down.
            let call = self
                .breaker
                .call_with(|error: &CallError| matches!(error, CallError::Retriable(_)), self.call(body.clone()));
            let reason = match call.await {
                Ok(answer) => return Attempted::Answered { body: answer, attempts },
                Err(recloser::Error::Rejected) => return Attempted::BreakerOpen,
                Err(recloser::Error::Inner(CallError::Rejected { status, body })) => {
                    return Attempted::Rejected { status, body, attempts };
                }
                Err(recloser::Error::Inner(CallError::Retriable(reason))) => reason,
            };
            if attempts > self.config.max_retries {
                return Attempted::GaveUp {
                    reason: format!("ML API failed after {attempts} attempts: {reason}"),
                    attempts,
                };
            }
            let delay = backoff_delay(
                attempts,
                Duration::from_millis(self.config.retry_initial_backoff_ms),
                Duration::from_millis(self.config.retry_max_backoff_ms),
                rand::rng().random::<f64>(),
            );
            tracing::debug!(attempts, ?delay, reason, "retrying the ML API");
            tokio::time::sleep(delay).await;
        }
    }

    async fn call(&self, body: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let result = self.http.post(&self.url).header("content-type", "application/json").body(body).send().await;
        let outcome = match result {
            Err(error) => Err(CallError::Retriable(format!("request failed: {error}"))),
            Ok(response) => {
                let status = response.status().as_u16();
                match (classify_status(status), response.bytes().await) {
                    (StatusClass::Success, Ok(bytes)) => Ok(bytes.to_vec()),
                    (StatusClass::Success, Err(error)) => {
                        Err(CallError::Retriable(format!("reading the answer: {error}")))
                    }
                    (StatusClass::Retriable, body) => Err(CallError::Retriable(format!(
                        "status {status}: {}",
                        truncate(&String::from_utf8_lossy(&body.unwrap_or_default()), 200)
                    ))),
                    (StatusClass::Rejected, body) => Err(CallError::Rejected {
                        status,
                        body: String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
                    }),
                }
            }
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(CallError::Retriable(_)) => "retriable",
            Err(CallError::Rejected { .. }) => "rejected",
        };
        METRICS.ml_api_latency.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        outcome
    }
}

fn prediction_failed(message: String, attempts: u32) -> Failure {
    Failure { error_type: ErrorType::PredictionFailed, stage: Stage::Predict, message, attempts }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}
