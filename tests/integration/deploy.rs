//! The deployment: `compose.yaml` and the Grafana dashboard,
//! checked without a Docker engine.

use std::collections::BTreeSet;
use std::time::Duration;

fn compose() -> serde_yaml::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/compose.yaml")).unwrap();
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose.yaml is YAML");
    // Resolve the `<<: *anchor` merge keys, as compose does.
    compose.apply_merge().unwrap();
    compose
}

fn services(compose: &serde_yaml::Value) -> Vec<(String, serde_yaml::Value)> {
    compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.as_str().unwrap().to_string(), service.clone()))
        .collect()
}

#[test]
fn compose_runs_three_brokers_two_replicas_and_checks_every_service() {
    let compose = compose();
    let services = services(&compose);
    let brokers: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s["environment"]["KAFKA_PROCESS_ROLES"].as_str().is_some_and(|r| r.contains("broker")))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(brokers, ["kafka-1", "kafka-2", "kafka-3"], "three KRaft brokers");
    for (name, broker) in services.iter().filter(|(name, _)| brokers.contains(&name.as_str())) {
        // kafka-storage format refuses a cluster id that is not a base64 UUID.
        let cluster_id = broker["environment"]["CLUSTER_ID"].as_str().unwrap();
        assert!(
            cluster_id.len() == 22 && cluster_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{name}: CLUSTER_ID {cluster_id:?} is a URL-safe base64 UUID"
        );
        // The log lives on the broker's volume, not in the image's /tmp default.
        let log_dirs = broker["environment"]["KAFKA_LOG_DIRS"].as_str().unwrap();
        let volume = broker["volumes"][0].as_str().unwrap();
        assert_eq!(volume, format!("{name}:{log_dirs}"), "{name} keeps its log on its volume");
    }
    let init = services.iter().find(|(name, _)| name == "kafka-init").expect("a topic init service");
    let script = serde_yaml::to_string(&init.1["command"]).unwrap();
    for topic in ["transactions:3", "failed-transactions", "predictions"] {
        assert!(script.contains(topic), "kafka-init creates {topic}");
    }
    assert!(script.contains("--replication-factor 3"), "replication factor 3");
    assert!(script.contains("min.insync.replicas=2"), "min ISR 2");
    let txnflow = services.iter().find(|(name, _)| name == "txnflow").expect("the txnflow service");
    assert_eq!(txnflow.1["deploy"]["replicas"].as_u64(), Some(2), "two replicas in one consumer group");
    assert_eq!(txnflow.1["command"][0].as_str(), Some("run"));

    for (name, service) in &services {
        assert!(service["healthcheck"]["test"].is_sequence(), "{name} has a health check");
        let image = service["image"].as_str().unwrap_or_else(|| panic!("{name} names its image"));
        let tag = image.rsplit_once(':').map(|(_, tag)| tag);
        assert!(tag.is_some_and(|t| !t.is_empty() && t != "latest"), "{name}: {image} has a pinned tag");
        if let Some(depends) = service["depends_on"].as_mapping() {
            for (on, how) in depends {
                assert!(how["condition"].is_string(), "{name} depends on {on:?} with a condition");
            }
        }
        if let Some(environment) = service["environment"].as_mapping() {
            for (key, value) in environment {
                let (key, value) = (key.as_str().unwrap(), value.as_str().unwrap_or_default());
                if key.contains("PASSWORD") || key.contains("SECRET") || key.contains("TOKEN") {
                    assert!(value.starts_with("${"), "{name}: {key} comes from the environment");
                }
            }
        }
    }
    // txnflow is configured through TXNFLOW__ variables only.
    let environment = txnflow.1["environment"].as_mapping().unwrap();
    assert!(environment.keys().all(|k| k.as_str().unwrap().starts_with("TXNFLOW__")));
    // It listens beyond loopback, so it needs a token, which compose requires.
    assert_eq!(environment[&serde_yaml::Value::from("TXNFLOW__ADMIN__LISTEN")].as_str(), Some("0.0.0.0:8088"));
    let token = environment[&serde_yaml::Value::from("TXNFLOW__ADMIN__TOKEN")].as_str().unwrap();
    assert!(token.starts_with("${TXNFLOW_ADMIN_TOKEN:?"), "the token is required from the environment: {token}");
}

/// Traces: the replicas and the ML API export to Tempo over OTLP/HTTP, the
/// ML API under its own service name; the producer starts a trace per
/// record; Grafana has Tempo as a data source, and the dashboard's ML API
/// latency panel links to the calls' traces in it.
#[test]
fn compose_sends_traces_to_tempo_and_grafana_reads_them() {
    let compose = compose();
    let services = services(&compose);
    let service = |name: &str| services.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()).unwrap();
    let tempo = service("tempo");
    assert!(tempo["image"].as_str().unwrap().starts_with("grafana/tempo:"));
    let config_file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/tempo/tempo.yaml")).unwrap();
    let config: serde_yaml::Value = serde_yaml::from_str(&config_file).unwrap();
    assert_eq!(
        config["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"].as_str(),
        Some("0.0.0.0:4318")
    );
    assert_eq!(config["server"]["http_listen_port"].as_u64(), Some(3200));
    for name in ["txnflow", "ml-api"] {
        let environment = &service(name)["environment"];
        assert_eq!(
            environment["TXNFLOW__TRACING__OTLP_ENDPOINT"].as_str(),
            Some("http://tempo:4318/v1/traces"),
            "{name} exports its traces to Tempo"
        );
    }
    assert_eq!(service("ml-api")["environment"]["TXNFLOW__TRACING__SERVICE_NAME"].as_str(), Some("ml-api"));
    assert_eq!(service("producer")["command"][1].as_str(), Some("--traceparent"));
    assert_eq!(service("grafana")["depends_on"]["tempo"]["condition"].as_str(), Some("service_healthy"));
    let datasources = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/provisioning/datasources/tempo.yml"
    ))
    .unwrap();
    let datasources: serde_yaml::Value = serde_yaml::from_str(&datasources).unwrap();
    let source = &datasources["datasources"][0];
    assert_eq!((source["type"].as_str(), source["uid"].as_str()), (Some("tempo"), Some("tempo")));
    assert_eq!(source["url"].as_str(), Some("http://tempo:3200"));
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/txnflow.json"))
        .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let latency = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"].as_str().unwrap().starts_with("ML API latency"))
        .unwrap();
    let url = latency["links"][0]["url"].as_str().unwrap();
    let decoded =
        url.replace("%22", "\"").replace("%3A", ":").replace("%2C", ",").replace("%5B", "[").replace("%5D", "]");
    assert!(url.starts_with("/explore?"), "{url}");
    assert!(decoded.contains("\"uid\":\"tempo\"") && decoded.contains("traceql"), "the link queries Tempo: {decoded}");
}

/// The `airflow` profile adds Airflow, off by default, with the DAG folder
/// mounted and the txnflow service as the DAG's target.
#[test]
fn the_airflow_profile_adds_airflow_with_the_dag() {
    let compose = compose();
    let services = services(&compose);
    let in_profile: Vec<&str> = services
        .iter()
        .filter(|(_, s)| s["profiles"].as_sequence().is_some_and(|p| p.iter().any(|p| p == "airflow")))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        in_profile,
        ["airflow-db", "airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]
    );
    for (name, service) in services.iter().filter(|(name, _)| name.starts_with("airflow-") && name != "airflow-db") {
        assert_eq!(service["image"].as_str(), Some("apache/airflow:3.1.8"), "{name}");
        assert_eq!(service["environment"]["TXNFLOW_ADMIN_URL"].as_str(), Some("http://txnflow:8088"), "{name}");
        let volumes = serde_yaml::to_string(&service["volumes"]).unwrap();
        assert!(volumes.contains("./orchestration/dags:/opt/airflow/dags"), "{name} mounts the DAGs: {volumes}");
    }
    let scheduler = &services.iter().find(|(name, _)| name == "airflow-scheduler").unwrap().1;
    assert_eq!(scheduler["depends_on"]["txnflow"]["condition"].as_str(), Some("service_healthy"));
}

/// Debian's `docker-compose` (1.29, installed by `make up`) validates the
/// file offline, with and without the airflow profile: no engine is needed
/// for `config`.
#[test]
fn docker_compose_config_accepts_the_file() {
    for profile in [None, Some("airflow")] {
        let mut command = std::process::Command::new("docker-compose");
        command.current_dir(env!("CARGO_MANIFEST_DIR")).args(["-f", "compose.yaml"]);
        if let Some(profile) = profile {
            command.args(["--profile", profile]);
        }
        let without_token = command.args(["config", "-q"]).env_remove("TXNFLOW_ADMIN_TOKEN").output().unwrap();
        assert!(!without_token.status.success(), "compose refuses to deploy without an admin token");
        assert!(String::from_utf8_lossy(&without_token.stderr).contains("TXNFLOW_ADMIN_TOKEN"));
        let output = command
            .env("TXNFLOW_ADMIN_TOKEN", "a-token-of-the-operator")
            .output()
            .expect("docker-compose runs (make up installs Debian's docker-compose)");
        assert!(
            output.status.success(),
            "docker-compose config, profile {profile:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stderr), "", "no warning");
    }
}

#[test]
fn the_dockerfile_builds_the_binary_ci_tests() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    // CI builds the default features of this package; so does the image.
    assert!(dockerfile.contains("cargo build --release --locked --bin txnflow"), "{dockerfile}");
    assert!(!dockerfile.contains("--features") && !dockerfile.contains("--no-default-features"));
    assert!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    assert!(!dockerfile.contains(":latest"));
    // `COPY . .` takes the context: a local config (secrets) stays out.
    let ignored = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore")).unwrap();
    let ignored: BTreeSet<&str> = ignored.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    for path in ["config/local.toml", "target", ".stack", ".git"] {
        assert!(ignored.contains(path), ".dockerignore leaves out {path}");
    }
}

/// The metric names a dashboard query uses (histogram series reduced to
/// their family).
fn dashboard_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/txnflow.json"))
        .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(start) = rest.find("txnflow_") {
                let name: String =
                    rest[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[start + name.len()..];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name)
                    .to_string();
                names.insert(family);
            }
        }
    }
    names
}

/// The dashboard names only metrics a running instance exports, and shows
/// what an operator watches: throughput by outcome, lag, DLQ rate, ML latency, breaker,
/// buffer depth, actor restarts.
#[tokio::test]
async fn the_dashboard_queries_only_exported_metrics() {
    let used = dashboard_metrics();
    for family in [
        "txnflow_records_total",
        "txnflow_consumer_lag",
        "txnflow_dlq_records_total",
        "txnflow_ml_api_latency_seconds",
        "txnflow_circuit_breaker_state",
        "txnflow_buffer_depth",
        "txnflow_actor_restarts_total",
    ] {
        assert!(used.contains(family), "the dashboard shows {family}");
    }
    let scenario = crate::scenario::Scenario::new("dashboard").await;
    let service = scenario.start_service(&[]).await;
    let ends = crate::scenario::Scenario::end_offsets(&scenario.produce(&crate::scenario::valid_events(91, 30)).await);
    assert_eq!(scenario.wait_committed(&ends, std::time::Duration::from_secs(60)).await, ends);
    // The lag family appears once librdkafka's statistics report a lag.
    let mut exported = BTreeSet::new();
    for _ in 0..60 {
        exported = service
            .metrics()
            .await
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_string)
            .collect();
        if used.is_subset(&exported) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "dashboard metrics not exported: {unknown:?}");
    // Every metric family (the lag's included, now it is reported) says
    // what it measures.
    let text = service.metrics().await;
    for family in crate::streaming::METRIC_FAMILIES {
        let help = text.lines().find_map(|line| line.strip_prefix(&format!("# HELP {family} ")));
        assert!(help.is_some_and(|help| help.len() > 10), "{family} has help text: {help:?}");
    }
}

/// Every metric family is on a running instance's `/metrics`, and the
/// counters the dashboard plots move by exactly the load put through.
#[tokio::test]
async fn metric_values_move_with_the_load() {
    let scenario = crate::scenario::Scenario::new("metricsmove").await;
    let service = scenario.start_service(&[]).await;
    let first = crate::scenario::valid_events(92, 10);
    let ends = crate::scenario::Scenario::end_offsets(&scenario.produce(&first).await);
    assert_eq!(scenario.wait_committed(&ends, std::time::Duration::from_secs(60)).await, ends);
    let series = [
        "txnflow_records_total{outcome=\"read\",source=\"kafka\"}",
        "txnflow_records_total{outcome=\"written\",source=\"kafka\"}",
        "txnflow_records_total{outcome=\"predicted\",source=\"kafka\"}",
        "txnflow_records_total{outcome=\"invalid\",source=\"kafka\"}",
        "txnflow_dlq_records_total{error_type=\"invalid\"}",
        "txnflow_ml_api_batch_size_sum{caller=\"pipeline\"}",
        "txnflow_db_write_duration_seconds_count{outcome=\"ok\"}",
        "txnflow_ml_api_latency_seconds_count{outcome=\"ok\"}",
    ];
    let mut before = Vec::new();
    for name in series {
        before.push(service.metric(name).await);
    }
    let valid = crate::scenario::valid_events(93, 500);
    let invalid = crate::scenario::invalid_events(94, 20);
    let mut events = valid.clone();
    events.extend(invalid);
    let sent = scenario.produce(&events).await;
    let mut all = crate::scenario::Scenario::end_offsets(&sent);
    for (partition, end) in ends {
        let known = all.entry(partition).or_insert(0);
        *known = (*known).max(end);
    }
    assert_eq!(scenario.wait_committed(&all, std::time::Duration::from_secs(60)).await, all);
    let mut after = Vec::new();
    for name in series {
        after.push(service.metric(name).await);
    }
    let moved: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(moved[0], 520.0, "records read");
    assert_eq!(moved[1], 500.0, "records written");
    assert_eq!(moved[2], 500.0, "records predicted");
    assert_eq!(moved[3], 20.0, "records invalid");
    assert_eq!(moved[4], 20.0, "DLQ records, invalid");
    assert_eq!(moved[5], 500.0, "transactions sent to the ML API");
    assert!(moved[6] >= 1.0, "database writes counted: {}", moved[6]);
    assert!(moved[7] >= 5.0, "ML API calls counted (500 in batches of 100): {}", moved[7]);
}

/// `log.format = "json"`: each line is one flat JSON object, and the lines
/// of the pipeline carry the actor that wrote them, the flush a batch of
/// records belongs to, and the batch run (issue: observability).
#[tokio::test]
async fn json_logs_carry_the_actor_the_flush_id_and_the_run_id() {
    use crate::scenario::{Scenario, invalid_events, valid_events};
    use std::collections::BTreeMap;
    let scenario = Scenario::new("jsonlogs").await;
    let service = scenario
        .start_service(&[
            ("TXNFLOW__LOG__FORMAT", "json"),
            ("TXNFLOW__LOG__LEVEL", "info,txnflow=debug"),
            ("TXNFLOW__BUFFER__MAX_RECORDS", "100"),
        ])
        .await;
    let mut events = valid_events(95, 300);
    events.extend(invalid_events(96, 10));
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, std::time::Duration::from_secs(60)).await, ends);

    let seed = std::fs::read_to_string(crate::helpers::seed_csv_path()).unwrap();
    let file: String = seed.lines().take(121).map(|line| format!("{line}\n")).collect();
    let uri = crate::batch::Folder::new().await.put("month.csv", file.into_bytes()).await;
    let run_id = format!("jsonlogs-{}", uuid::Uuid::new_v4().simple());
    let client = reqwest::Client::new();
    let posted = client
        .post(format!("{}/batches", service.admin))
        .json(&serde_json::json!({"uri": uri, "run_id": run_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status().as_u16(), 202);
    let mut status = String::new();
    for _ in 0..600 {
        let report: serde_json::Value =
            client.get(format!("{}/batches/{run_id}", service.admin)).send().await.unwrap().json().await.unwrap();
        status = report["status"].as_str().unwrap_or_default().to_string();
        if status != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, "completed");

    let text = std::fs::read_to_string(&service.log).unwrap();
    let lines: Vec<serde_json::Map<String, serde_json::Value>> = text
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(serde_json::Value::Object(object)) => object,
            _ => panic!("not one JSON object: {line}"),
        })
        .collect();
    let text_of = |line: &serde_json::Map<String, serde_json::Value>, key: &str| {
        line.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_string()
    };
    let mut actors_seen = BTreeSet::new();
    // flush id -> (records flushed, asked to predict, made durable)
    let mut flushes: BTreeMap<u64, [u64; 3]> = BTreeMap::new();
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line.get(key).is_some_and(|v| v.is_string()), "{key} in {line:?}");
        }
        let target = text_of(line, "target");
        // An actor's module, or its folder (`kafka_reader::callbacks`).
        if let Some(module) = target.strip_prefix("txnflow::actors::").and_then(|path| path.split("::").next()) {
            assert_eq!(text_of(line, "actor"), module, "the actor of {line:?}");
            actors_seen.insert(module.to_string());
        }
        let count = |key: &str| line[key].as_u64().unwrap_or_else(|| panic!("{key} in {line:?}"));
        let slot = match text_of(line, "message").as_str() {
            "flush" => Some((0, count("size"))),
            "flush predicted" => Some((1, count("asked"))),
            "flush durable" => Some((2, count("total"))),
            _ => None,
        };
        if let Some((stage, records)) = slot {
            let flush_id = line["flush_id"].as_u64().unwrap_or_else(|| panic!("flush_id in {line:?}"));
            let counts = flushes.entry(flush_id).or_default();
            assert_eq!(counts[stage], 0, "flush {flush_id} logged once per stage");
            counts[stage] = records;
        }
    }
    assert_eq!(
        actors_seen,
        BTreeSet::from(["buffer", "csv_loader", "db_writer", "kafka_reader", "predict_client"].map(String::from)),
    );
    for (flush_id, [flushed, asked, durable]) in &flushes {
        assert!(*flushed > 0 && *flushed <= 100, "flush {flush_id}: {flushed} records");
        assert_eq!((asked, durable), (flushed, flushed), "flush {flush_id} through every stage");
    }
    let total: u64 = flushes.values().map(|[flushed, _, _]| flushed).sum();
    assert_eq!(total, 300 + 120, "every valid record and row is in one flush");

    let run_lines: Vec<(String, String)> = lines
        .iter()
        .filter(|line| text_of(line, "run_id") == run_id)
        .map(|line| (text_of(line, "actor"), text_of(line, "message")))
        .collect();
    let actor = || "csv_loader".to_string();
    assert_eq!(run_lines, [(actor(), "batch run started".to_string()), (actor(), "batch run completed".to_string())]);
}

fn prometheus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

/// `promtool` (Debian's prometheus package, installed by `make up`) checks
/// the Prometheus configuration with its rule file, and runs the alert
/// rules' unit tests (`deploy/prometheus/alerts.test.yml`).
#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [&["check", "config", "prometheus.yml"][..], &["test", "rules", "alerts.test.yml"]] {
        let output = std::process::Command::new("promtool")
            .current_dir(prometheus_dir())
            .args(args)
            .output()
            .expect("promtool runs (make up installs Debian's prometheus)");
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Each dashboard panel's queries: (panel title, PromQL).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/txnflow.json"))
        .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((panel["title"].as_str().unwrap().to_string(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    queries
}

/// A real Prometheus (Debian's 2.42) scrapes a running instance under load:
/// every dashboard query evaluates and returns series, and every alert rule
/// evaluates without error against the real metrics.
#[tokio::test]
async fn a_real_prometheus_evaluates_every_dashboard_query_and_alert_rule() {
    use crate::scenario::{Scenario, invalid_events, valid_events};
    let scenario = Scenario::new("prometheus").await;
    let service = scenario.start_service(&[]).await;
    let target = service.admin.trim_start_matches("http://").to_string();
    let dir = std::env::temp_dir().join(format!("txnflow-prometheus-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [{rules:?}]\n\
         scrape_configs:\n  - job_name: txnflow\n    static_configs: [{{targets: [{target:?}]}}]\n",
        rules = prometheus_dir().join("alerts.yml").display().to_string(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = crate::helpers::free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = crate::helpers::ChildGuard(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts (make up installs Debian's prometheus)"),
    );
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let client = reqwest::Client::new();
    let query = |expr: String| {
        let client = client.clone();
        let api = api.clone();
        async move {
            let url = reqwest::Url::parse_with_params(&format!("{api}/query"), [("query", &expr)]).unwrap();
            let response = client.get(url).send().await;
            match response {
                Ok(response) => response.json::<serde_json::Value>().await.unwrap(),
                Err(_) => serde_json::json!({"status": "unreachable"}),
            }
        }
    };

    // A first scrape before the load: rate() sees a counter move only
    // from a sample taken before the move.
    let started = std::time::Instant::now();
    while query("up{job=\"txnflow\"} == 1".to_string()).await["data"]["result"].as_array().is_none_or(Vec::is_empty) {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "prometheus never scraped {target}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Load with every outcome the panels show, and one actor restart.
    let mut events = valid_events(97, 400);
    events.extend(invalid_events(98, 20));
    let ends = Scenario::end_offsets(&scenario.produce(&events).await);
    assert_eq!(scenario.wait_committed(&ends, std::time::Duration::from_secs(60)).await, ends);
    service.chaos("buffer", "crash").await;

    let queries = dashboard_queries();
    assert_eq!(queries.len(), 12, "{queries:?}");
    let mut empty: Vec<String> = queries.iter().map(|(title, expr)| format!("{title}: {expr}")).collect();
    let started = std::time::Instant::now();
    while !empty.is_empty() && started.elapsed() < std::time::Duration::from_secs(90) {
        empty.clear();
        for (title, expr) in &queries {
            let answer = query(expr.clone()).await;
            let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
            if answer["status"] != "success" || series == 0 {
                empty.push(format!("{title}: {expr}: {answer}"));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");

    let rules: serde_json::Value = client.get(format!("{api}/rules")).send().await.unwrap().json().await.unwrap();
    let evaluated: Vec<(String, String, String)> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().clone())
        .map(|rule| {
            let text = |key: &str| rule[key].as_str().unwrap_or_default().to_string();
            (text("name"), text("health"), text("lastError"))
        })
        .collect();
    let names: Vec<&str> = evaluated.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "TxnflowDown",
            "TxnflowLagGrowing",
            "TxnflowBreakerOpen",
            "TxnflowInvalidRecords",
            "TxnflowPersistFailed",
            "TxnflowActorsRestarting",
            "TxnflowStalled"
        ]
    );
    for (name, health, error) in &evaluated {
        assert_eq!((health.as_str(), error.as_str()), ("ok", ""), "{name}");
    }
    // The one alert this load raises: invalid records reached the DLQ. It
    // is pending (its `for` is 5 minutes). One restart is under the
    // restart alert's threshold of 3.
    // A rule evaluated while the load was still in flight may show pending
    // for an evaluation or two (TxnflowStalled, before the first write is
    // counted): wait for the set to settle, then check it exactly.
    let expected = BTreeSet::from([("TxnflowInvalidRecords".to_string(), "pending".to_string())]);
    let started = std::time::Instant::now();
    let mut alerts = BTreeSet::new();
    while alerts != expected && started.elapsed() < std::time::Duration::from_secs(60) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let answer = query("ALERTS".to_string()).await;
        alerts = answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|alert| {
                let label = |key: &str| alert["metric"][key].as_str().unwrap_or_default().to_string();
                (label("alertname"), label("alertstate"))
            })
            .collect();
    }
    assert_eq!(alerts, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The local cluster's settings that compose's brokers must share.
const SHARED_BROKER_SETTINGS: [&str; 14] = [
    "num.partitions",
    "default.replication.factor",
    "min.insync.replicas",
    "offsets.topic.replication.factor",
    "offsets.topic.num.partitions",
    "transaction.state.log.replication.factor",
    "transaction.state.log.min.isr",
    "share.coordinator.state.topic.replication.factor",
    "share.coordinator.state.topic.min.isr",
    "group.initial.rebalance.delay.ms",
    "group.consumer.min.session.timeout.ms",
    "group.consumer.session.timeout.ms",
    "group.consumer.heartbeat.interval.ms",
    "auto.create.topics.enable",
];

fn properties(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

/// compose's broker settings are valid for Kafka 4.4 and are the local
/// cluster's: kafka-1's environment, as compose resolves it, is turned into
/// `server.properties` by the image's own converter (`kafka.docker.KafkaDockerWrapper`,
/// in the `kafka_2.13` jar that `make up` fetched), which also formats the
/// log directory; then a real node starts with it. Only host names, ports,
/// the log directory and the quorum (this node alone) are changed for loopback.
#[tokio::test]
async fn compose_broker_settings_start_a_real_kafka_node() {
    let compose = compose();
    let image = compose["services"]["kafka-1"]["image"].as_str().unwrap();
    assert_eq!(image, "apache/kafka:4.4.0", "compose runs Kafka 4.4");
    let kafka_home = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack/kafka");
    assert!(
        kafka_home.join("lib/kafka_2.13-4.4.0.jar").exists(),
        "the jars of the image's Kafka version are the local cluster's (make up)"
    );
    let dir = std::env::temp_dir().join(format!("txnflow-compose-kafka-{}", uuid::Uuid::new_v4().simple()));
    let (client, controller) = (crate::helpers::free_port(), crate::helpers::free_port());
    let mut env: Vec<(String, String)> = Vec::new();
    for (key, value) in compose["services"]["kafka-1"]["environment"].as_mapping().unwrap() {
        let key = key.as_str().unwrap().to_string();
        let value = match value {
            serde_yaml::Value::String(text) => text.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_string(),
        };
        let value = match key.as_str() {
            "KAFKA_LISTENERS" => format!("PLAINTEXT://127.0.0.1:{client},CONTROLLER://127.0.0.1:{controller}"),
            "KAFKA_ADVERTISED_LISTENERS" => format!("PLAINTEXT://127.0.0.1:{client}"),
            "KAFKA_CONTROLLER_QUORUM_VOTERS" => format!("1@127.0.0.1:{controller}"),
            "KAFKA_LOG_DIRS" => dir.join("data").display().to_string(),
            _ => value,
        };
        env.push((key, value));
    }
    let heap = env.iter().find(|(key, _)| key == "KAFKA_HEAP_OPTS").map(|(_, v)| v.clone()).expect("a bounded heap");
    for sub in ["default", "mounted", "final"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let classpath = kafka_home.join("lib/*");
    let setup = std::process::Command::new("java")
        .arg("-cp")
        .arg(&classpath)
        .args(["kafka.docker.KafkaDockerWrapper", "setup"])
        .arg("--default-configs-dir")
        .arg(dir.join("default"))
        .arg("--mounted-configs-dir")
        .arg(dir.join("mounted"))
        .arg("--final-configs-dir")
        .arg(dir.join("final"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(env.iter().cloned())
        .output()
        .expect("java runs");
    assert!(setup.status.success(), "the image's setup: {}", String::from_utf8_lossy(&setup.stdout));
    let written = std::fs::read_to_string(dir.join("final/server.properties")).unwrap();
    let compose_settings = properties(&written);
    assert!(!compose_settings.contains_key("heap.opts"), "KAFKA_HEAP_OPTS is the JVM's, not a property");

    // The same settings as the local cluster's nodes.
    let local = properties(&std::fs::read_to_string(kafka_home.join("node-1.properties")).unwrap());
    for key in SHARED_BROKER_SETTINGS {
        assert_eq!(compose_settings.get(key), local.get(key), "{key}: compose and the local cluster agree");
    }

    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let node = crate::helpers::ChildGuard(
        std::process::Command::new("java")
            .args(heap.split_whitespace())
            .arg("-cp")
            .arg(&classpath)
            .arg(format!("-Dlog4j2.configurationFile={}", dir.join("final/log4j2.yaml").display()))
            .arg("kafka.Kafka")
            .arg(dir.join("final/server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The node answers with its metadata: one broker, id 1.
    let brokers = format!("127.0.0.1:{client}");
    let mut answered = None;
    for _ in 0..120 {
        let consumer: rdkafka::consumer::BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        if let Ok(metadata) = rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, Duration::from_secs(1)) {
            answered = Some(metadata.brokers().iter().map(|b| b.id()).collect::<Vec<_>>());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let tail = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    assert_eq!(answered, Some(vec![1]), "the node started with compose's settings; its log:\n{tail}");
    // What the running broker reports is what compose asked for.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let described = admin
        .describe_configs(&[rdkafka::admin::ResourceSpecifier::Broker(1)], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let config = described.into_iter().next().unwrap().expect("broker 1 describes its config");
    for key in ["min.insync.replicas", "default.replication.factor", "group.initial.rebalance.delay.ms"] {
        let entry = config.get(key).unwrap_or_else(|| panic!("{key} described"));
        assert_eq!(entry.value.as_deref(), compose_settings.get(key).map(String::as_str), "{key} in force");
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
