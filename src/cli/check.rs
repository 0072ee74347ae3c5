//! `txnflow check`: connects to every dependency with the configured
//! settings, as the service would, and prints one line per check: the
//! broker (with its security settings), the pipeline's topics, the consumer
//! group's lag, PostgreSQL and its schema, the S3 bucket, and the ML API
//! (health, and one sample prediction checked like any other).

use std::collections::HashSet;
use std::time::Duration;

use crate::config::Config;
use crate::domain::prediction::{AnswerRules, PredictRequestItem, check_answer};

/// One check's outcome: what was checked, and `Ok(detail)` or `Err(reason)`.
struct Outcome {
    what: String,
    result: Result<String, String>,
}

/// Runs every check, prints them, and fails when any did.
pub fn run(config: &Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let outcomes = runtime.block_on(checks(config));
    let failed = outcomes.iter().filter(|outcome| outcome.result.is_err()).count();
    for outcome in &outcomes {
        match &outcome.result {
            Ok(detail) => println!("ok      {}: {detail}", outcome.what),
            Err(reason) => println!("FAILED  {}: {reason}", outcome.what),
        }
    }
    println!("{} checks, {failed} failed", outcomes.len());
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed", outcomes.len());
    }
    Ok(())
}

async fn checks(config: &Config) -> Vec<Outcome> {
    let kafka = &config.kafka;
    let mut outcomes = Vec::new();
    let broker = format!("broker {} ({})", kafka.brokers, kafka.security_protocol);
    match crate::kafka::cluster(kafka).await {
        Ok(cluster) => {
            outcomes.push(Outcome { what: broker, result: Ok(format!("{} broker(s)", cluster.brokers.len())) });
            for (topic, _) in crate::kafka::pipeline_topics(kafka) {
                let result = match cluster.topics.get(topic) {
                    None => Err("does not exist (txnflow setup creates it)".to_string()),
                    Some(replicas) => Ok(format!(
                        "{} partition(s), replication {}",
                        replicas.len(),
                        replicas.iter().min().copied().unwrap_or(0)
                    )),
                };
                outcomes.push(Outcome { what: format!("topic {topic}"), result });
            }
            let what = format!("consumer group {}", kafka.group_id);
            let result = match cluster.topics.get(&kafka.topic) {
                Some(partitions) => group_lag(kafka.clone(), partitions.len() as i32).await,
                None => Err(format!("not checked: {} does not exist", kafka.topic)),
            };
            outcomes.push(Outcome { what, result });
        }
        Err(error) => {
            outcomes.push(Outcome { what: broker, result: Err(crate::domain::redaction::short_reason(error)) })
        }
    }
    outcomes.push(Outcome {
        what: format!("postgresql {}", crate::domain::redaction::redact(&config.db.url)),
        result: database(config.db.url.clone()).await,
    });
    outcomes.push(Outcome { what: format!("s3 bucket {}", config.s3.bucket), result: bucket(config).await });
    if !config.schema_registry.url.is_empty() {
        outcomes.push(Outcome {
            what: format!("schema registry {}", crate::domain::redaction::redact(&config.schema_registry.url)),
            result: schema_registry(config).await,
        });
    }
    let (health, prediction) = ml_api(config).await;
    outcomes.push(Outcome { what: format!("ml api {}", config.predict.url), result: health });
    outcomes.push(Outcome { what: "sample prediction".into(), result: prediction });
    outcomes
}

/// The group's committed offsets against the partitions' high watermarks.
async fn group_lag(kafka: crate::config::KafkaConfig, partitions: i32) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer<crate::kafka::KafkaContext> = crate::kafka::client_config(&kafka)
            .set("group.id", &kafka.group_id)
            .create_with_context(crate::kafka::KafkaContext)
            .map_err(crate::domain::redaction::short_reason)?;
        let mut list = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&kafka.topic, partition);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .map_err(crate::domain::redaction::short_reason)?;
        let mut parts = Vec::new();
        let mut total = 0i64;
        for element in committed.elements() {
            let (_, high) = consumer
                .fetch_watermarks(&kafka.topic, element.partition(), Duration::from_secs(10))
                .map_err(crate::domain::redaction::short_reason)?;
            let lag = match element.offset() {
                rdkafka::Offset::Offset(offset) => (high - offset).max(0),
                // Nothing committed yet: all of it.
                _ => high.max(0),
            };
            total += lag;
            parts.push(format!("{} {lag}", element.partition()));
        }
        Ok(format!("lag {total} (partition {})", parts.join(", ")))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// Reachable, and every migration applied.
async fn database(url: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        use diesel_migrations::MigrationHarness;
        let mut connection = crate::db::connect(&url).map_err(crate::domain::redaction::short_reason)?;
        let pending = connection.pending_migrations(crate::db::MIGRATIONS).map_err(|e| e.to_string())?;
        if pending.is_empty() {
            Ok("reachable, schema up to date".to_string())
        } else {
            Err(format!("reachable, but {} migration(s) pending: run txnflow migrate", pending.len()))
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

async fn bucket(config: &Config) -> Result<String, String> {
    let s3 = crate::batch::s3::client(&config.s3);
    match tokio::time::timeout(Duration::from_secs(10), s3.head_bucket().bucket(&config.s3.bucket).send()).await {
        Ok(Ok(_)) => Ok(format!("reachable at {}", config.s3.endpoint)),
        Ok(Err(error)) => Err(crate::domain::redaction::short_reason(error.into_service_error())),
        Err(_) => Err(format!("no answer from {} in 10 s", config.s3.endpoint)),
    }
}

/// The registry's subjects, and whether the input topic's is among them.
async fn schema_registry(config: &Config) -> Result<String, String> {
    let registry = crate::kafka::schema_registry::SchemaRegistry::new(&config.schema_registry)
        .map_err(|e| e.to_string())?
        .ok_or("no schema_registry.url")?;
    let subjects = registry.subjects().await.map_err(|e| e.to_string())?;
    let subject = format!("{}-value", config.kafka.topic);
    let registered =
        if subjects.contains(&subject) { "registered" } else { "not registered (txnflow setup registers it)" };
    Ok(format!("{} subject(s); {subject} {registered}", subjects.len()))
}

/// The ML API's `/health`, and one sample prediction checked like any other.
async fn ml_api(config: &Config) -> (Result<String, String>, Result<String, String>) {
    let http = match reqwest::Client::builder().timeout(Duration::from_millis(config.predict.timeout_ms)).build() {
        Ok(http) => http,
        Err(error) => return (Err(error.to_string()), Err("not tried".into())),
    };
    let base = config.predict.url.trim_end_matches('/');
    let health = match http.get(format!("{base}/health")).send().await {
        Ok(response) if response.status().is_success() => Ok(format!("/health answers {}", response.status())),
        Ok(response) => Err(format!("/health answers {}", response.status())),
        Err(error) => Err(crate::domain::redaction::short_reason(error)),
    };
    let sample =
        PredictRequestItem::example(uuid::Uuid::parse_str("b9fa6684-502b-4695-8f92-247432ba610d").expect("a uuid"));
    let prediction = match http.post(format!("{base}/predict")).json(&[&sample]).send().await {
        Ok(response) if response.status().is_success() => match response.bytes().await {
            Ok(body) => {
                let categories: HashSet<String> = config.predict.categories.iter().cloned().collect();
                let rules = AnswerRules {
                    categories: &categories,
                    default_model_version: &config.predict.default_model_version,
                };
                let checked = check_answer(&[sample.id], &body, &rules);
                match (checked.predicted.first(), checked.failed.first()) {
                    (Some(p), _) => Ok(format!("{} (model {})", p.category, p.model_version)),
                    (None, Some((_, reason))) => Err(reason.clone()),
                    (None, None) => Err("no prediction in the answer".into()),
                }
            }
            Err(error) => Err(crate::domain::redaction::short_reason(error)),
        },
        Ok(response) => Err(format!("/predict answers {}", response.status())),
        Err(error) => Err(crate::domain::redaction::short_reason(error)),
    };
    (health, prediction)
}
