//! The `txnflow` command line.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tracing_subscriber::fmt::format::JsonFields;
use txnflow::batch::s3;
use txnflow::cli::{dlq_replay, produce};
use txnflow::config::{Config, LogFormat};
use txnflow::ml::{breaker, reference_api as ml_api};
use txnflow::observability::log_format;
use txnflow::{db, kafka, service};

/// Exit status of a configuration that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

/// Shown after the top-level `--help`.
const EXAMPLES: &str = "\
Examples:
  txnflow check                              test every dependency with these settings
  txnflow run                                stream: Kafka -> ML API -> PostgreSQL
  txnflow batch s3://transactions/2026-12.csv
  txnflow batch ./transactions_fr.csv        a local file, or a directory of .csv files
  txnflow repredict --model-url http://127.0.0.1:8001 --since 2026-01-01
  txnflow models compare v1 v2
  txnflow models history 42

Configuration: config/default.toml, then config/local.toml, then --config FILE,
then environment variables TXNFLOW__SECTION__KEY, which win:
  TXNFLOW__DB__URL=postgres://... TXNFLOW__BUFFER__MAX_RECORDS=5000 txnflow run
Every key and its default: config/default.toml. Exit status: 0 done, 1 failed,
2 a configuration or usage error.";

#[derive(Parser)]
#[command(
    name = "txnflow",
    version,
    about = "Classifies financial transactions, losing nothing.",
    after_help = EXAMPLES
)]
struct Cli {
    /// A TOML file layered over config/default.toml and config/local.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the streaming service: Kafka -> ML API -> PostgreSQL, with the admin HTTP server.
    Run,
    /// Apply pending database migrations (harmless when up to date).
    Migrate,
    /// Create what the pipeline needs: topics, the bucket, the schema.
    Setup,
    /// Connect to every dependency with these settings and say, one line each, what answers.
    Check,
    /// Load a CSV file through the pipeline (batch mode): s3://bucket/key.csv,
    /// s3://bucket/prefix/ (every .csv under it) or a local path.
    Batch(BatchArgs),
    /// Simulate the seed system's two producers on the input topic.
    Produce(ProduceArgs),
    /// Run the reference ML prediction server.
    MlApi(MlApiArgs),
    /// Dead-letter queue tools.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Predict stored transactions again with a model (repredict.url, else predict.url), into
    /// prediction_history only; resumable: the same --run-id goes on where it stopped.
    Repredict(RepredictArgs),
    /// Model versions in prediction_history: list, compare, promote (roll back by promoting the earlier one).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Move old rows out of the working tables.
    #[command(subcommand)]
    Archive(ArchiveCommand),
}

#[derive(Args)]
struct RepredictArgs {
    /// Only transactions whose timestamp is at or after this (2026-01-01 or an RFC 3339 date-time).
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// Only transactions whose timestamp is before this.
    #[arg(long, value_name = "T")]
    until: Option<String>,
    /// Only transactions whose current prediction is this model version's.
    #[arg(long, value_name = "V")]
    from_model: Option<String>,
    /// The run id (generated when absent); a stopped run with this id resumes.
    #[arg(long)]
    run_id: Option<String>,
    /// The ML API to ask, instead of repredict.url (or predict.url).
    #[arg(long, value_name = "URL")]
    model_url: Option<String>,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// The model versions, with their predictions, coverage and current share.
    List,
    /// Agreement and the confusion table of A's latest predictions against B's.
    #[command(after_help = "Example: txnflow models compare v1 v2 --format csv > confusion.csv")]
    Compare {
        /// A model version, as `txnflow models list` shows it (e.g. v1).
        #[arg(value_name = "A")]
        a: String,
        /// The model version to compare it with.
        #[arg(value_name = "B")]
        b: String,
        /// table (default) or csv (a_category,b_category,transactions).
        #[arg(long, default_value = "table", value_parser = ["table", "csv"])]
        format: String,
    },
    /// Make V's latest prediction current for every transaction V has predicted (no ML API call).
    #[command(after_help = "Example: txnflow models promote v2   (roll back: promote the earlier version)")]
    Promote {
        /// The model version to make current, as `txnflow models list` shows it.
        #[arg(value_name = "VERSION")]
        version: String,
    },
    /// Every prediction of one transaction, across versions and the archive, newest first.
    History {
        /// The transaction's id: its UUID, or its source id (the seed's `1`, `2`, …).
        id: String,
        /// The most predictions shown (at most 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
        /// table (default) or json.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
}

/// The oldest cut `archive predictions --older-than` takes, in days.
const MAX_ARCHIVE_DAYS: i64 = 36_500;

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Move prediction_history rows older than DAYS, except current predictions, to prediction_history_archive.
    Predictions {
        /// Move the rows predicted more than DAYS days ago; at most 36,500 (100 years).
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(0..=MAX_ARCHIVE_DAYS))]
        older_than: u32,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Republish dead-lettered records (the DLQ topic, then the dead_letters table) to the input topic,
    /// through the pipeline again (idempotent).
    Replay {
        /// Replay these error types (repeatable): invalid, prediction_failed, persist_failed.
        /// Default: prediction_failed and persist_failed (invalid records fail again as they are).
        #[arg(long, value_parser = ["invalid", "prediction_failed", "persist_failed"])]
        error_type: Vec<String>,
        /// Replay the DLQ topic only, not the dead_letters table.
        #[arg(long)]
        topic_only: bool,
        /// Stop once the DLQ has been quiet this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        idle_ms: u64,
        /// Consumer group of the replay; a second replay in the same group resumes.
        #[arg(long, default_value = "txnflow-dlq-replay")]
        group: String,
    },
    /// List the dead letters stored in the dead_letters table (the DLQ topic refused them), without their values.
    List {
        /// Only these error types (repeatable); default: all.
        #[arg(long, value_parser = ["invalid", "prediction_failed", "persist_failed"])]
        error_type: Vec<String>,
        /// Also those already replayed.
        #[arg(long)]
        all: bool,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

#[derive(Args)]
#[command(after_help = "\
Examples:
  txnflow batch s3://transactions/2026-12.csv
  txnflow batch s3://transactions/december/            every .csv under the prefix
  txnflow batch ./transactions_fr.csv --run-id dec-1   a re-run with the same id stores nothing twice

Invalid rows go to an error file, with their line and the failing fields:
s3://<bucket>/errors/<run-id>.csv for an S3 input, <dir>/errors/<run-id>.csv
beside a local file (written only when a row is invalid).")]
struct BatchArgs {
    /// s3://bucket/key.csv, s3://bucket/prefix/, or a local file or directory.
    uri: String,
    /// The run id (lineage and error file name); generated when absent.
    #[arg(long)]
    run_id: Option<String>,
    /// Publish the valid rows to the input topic instead, for every replica to share.
    #[arg(long)]
    via_kafka: bool,
}

#[derive(Args)]
struct ProduceArgs {
    /// One steady producer at this many records per second, instead of the seed's two.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many records.
    #[arg(long)]
    count: Option<u64>,
    /// Share of malformed records (bad JSON, missing field, bad amount, bad side, bad timestamp).
    #[arg(long, default_value_t = 0.0)]
    invalid_ratio: f64,
    /// Replay this CSV file instead of generating records.
    #[arg(long, value_name = "FILE.csv")]
    from: Option<PathBuf>,
    /// Seed of the generator, for reproducible runs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Topic to write to (default: kafka.topic).
    #[arg(long)]
    topic: Option<String>,
    /// Give each record a new sampled W3C traceparent header.
    #[arg(long)]
    traceparent: bool,
    /// Record values: plain JSON, or framed for the schema registry in a
    /// schema format (registering the repository's schema first). A list
    /// gives each producer its own, in turn: `json,avro`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "json")]
    format: Vec<ProduceFormat>,
    /// The registry subject of the schema (default: <topic>-value).
    #[arg(long)]
    subject: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProduceFormat {
    Json,
    Avro,
    Protobuf,
    JsonSchema,
}

impl ProduceFormat {
    fn schema_format(self) -> Option<txnflow::domain::schema_event::SchemaFormat> {
        use txnflow::domain::schema_event::SchemaFormat;
        match self {
            ProduceFormat::Json => None,
            ProduceFormat::Avro => Some(SchemaFormat::Avro),
            ProduceFormat::Protobuf => Some(SchemaFormat::Protobuf),
            ProduceFormat::JsonSchema => Some(SchemaFormat::JsonSchema),
        }
    }
}

#[derive(Args)]
struct MlApiArgs {
    /// Listen address (default: ml_api.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Share of requests answered 500.
    #[arg(long)]
    error_rate: Option<f64>,
    /// Milliseconds added to every answer.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Requests the model works on at once; the others wait their turn (0: no limit).
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Share of answers that are not valid JSON.
    #[arg(long)]
    malformed_rate: Option<f64>,
    /// Share of items left out of each answer.
    #[arg(long)]
    drop_rate: Option<f64>,
    /// Also answer confidence_score and model_version.
    #[arg(long)]
    extended: bool,
    /// Answer 422 (or --status-for-marker) to any request with an item whose description contains this text.
    #[arg(long)]
    poison_marker: Option<String>,
    /// The status answered to a request holding a poison record (422, 500, 401, ...).
    #[arg(long, value_name = "CODE")]
    status_for_marker: Option<u16>,
    /// Share of ids refused with 422 on every request, the same ids each time.
    #[arg(long)]
    refuse_rate: Option<f64>,
    /// The model version answered with --extended.
    #[arg(long, value_name = "V")]
    model_version: Option<String>,
    /// Another model: each category index moved by K, mod 15 (0: the seed's answers).
    #[arg(long, value_name = "K")]
    shift: Option<u64>,
    /// Serve GET/POST /faults, to change the knobs at runtime (tests, local stack). Off by default.
    #[arg(long)]
    faults: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("txnflow: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // librdkafka checks the Kafka settings (unknown or invalid properties)
    // before any command that talks to Kafka starts.
    let uses_kafka = !matches!(
        cli.command,
        Command::Migrate | Command::MlApi(_) | Command::Repredict(_) | Command::Models(_) | Command::Archive(_)
    );
    if uses_kafka && let Err(error) = kafka::check_settings(&config.kafka) {
        eprintln!("txnflow: {error}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let traces = match init_logging(&config) {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("txnflow: tracing: {error:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    // The error is said once: as a plain line for people, or as the log's
    // JSON event for log pipelines.
    let json_logs = matches!(config.log.format, LogFormat::Json);
    let code = match run(cli.command, config) {
        Ok(()) => 0,
        // A rule checked only by the command that needs it (admin exposure).
        Err(error) if error.downcast_ref::<txnflow::config::ConfigError>().is_some() => {
            eprintln!("txnflow: {error:#}");
            i32::from(EXIT_BAD_CONFIG)
        }
        Err(error) if json_logs => {
            tracing::error!("{error:#}");
            1
        }
        Err(error) => {
            eprintln!("txnflow: {error:#}");
            1
        }
    };
    if let Some(traces) = traces {
        traces.shutdown();
    }
    leave(code)
}

/// Ends the process once its work is done and flushed.
///
/// `exit` would run the C libraries' exit handlers (OpenSSL's and GnuTLS's
/// cleanup, loaded with libpq) while the r2d2 pool's threads may still be
/// opening a connection in the background: libpq then uses a freed OpenSSL
/// and the process dies with SIGSEGV or "double free" after its work was
/// done (1 run in 100 of `txnflow batch` on a small file). Everything that
/// matters is durable by now, so the handlers are skipped.
fn leave(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Logs to stderr, and traces over OTLP when `tracing.otlp_endpoint` is
/// set (the provider is returned to be shut down, which exports what is
/// queued, at exit).
fn init_logging(config: &Config) -> anyhow::Result<Option<txnflow::observability::telemetry::Tracing>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level))
        // Recloser's raw events feed BreakerStateLayer, which logs the
        // transitions in our words; printed as well, they would be noise.
        .add_directive("recloser_event=off".parse().expect("a valid directive"));
    use tracing_subscriber::prelude::*;
    // Colours only on a terminal: log files and pipes get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        // Above the progress bar, when one is drawn.
        .with_writer(txnflow::observability::progress::LogWriter::default)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match config.log.format {
        LogFormat::Json => fmt.fmt_fields(JsonFields::new()).event_format(log_format::FlatJson).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let tracing = txnflow::observability::telemetry::start(&config.tracing, config.buffer.max_records)?;
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        // Sees recloser's transition events whatever the log level.
        .with(breaker::BreakerStateLayer.with_filter(breaker::layer_filter()))
        .init();
    Ok(tracing)
}

fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Run => service::run(config),
        Command::Check => txnflow::cli::check::run(&config),
        Command::Migrate => migrate(&config),
        Command::Setup => {
            tokio_runtime()?.block_on(async {
                let topics = kafka::pipeline_topics(&config.kafka);
                kafka::ensure_topics(&config.kafka, &topics).await?;
                let described: Vec<String> =
                    topics.iter().map(|(name, partitions)| format!("{name} ({partitions})")).collect();
                println!("topics ready: {}", described.join(", "));
                s3::ensure_bucket(&s3::client(&config.s3), &config.s3.bucket).await?;
                println!("bucket ready: {}", config.s3.bucket);
                txnflow::kafka::schema_registry::register_pipeline_schemas(&config).await?;
                anyhow::Ok(())
            })?;
            migrate(&config)
        }
        Command::Batch(args) if args.via_kafka => txnflow::cli::batch::publish(config, args.uri, args.run_id),
        Command::Batch(args) => txnflow::cli::batch::run(config, args.uri, args.run_id),
        Command::Produce(args) => {
            if !(0.0..=1.0).contains(&args.invalid_ratio) {
                anyhow::bail!("--invalid-ratio must be in [0, 1], got {}", args.invalid_ratio);
            }
            let options = produce::ProduceOptions {
                rate: args.rate,
                count: args.count,
                invalid_ratio: args.invalid_ratio,
                from: args.from,
                seed: args.seed,
                topic: args.topic,
                traceparent: args.traceparent,
                formats: args.format.iter().map(|format| format.schema_format()).collect(),
                subject: args.subject,
            };
            let delivered = tokio_runtime()?.block_on(produce::run(&config.kafka, &config.schema_registry, options))?;
            println!("produced {delivered} records");
            Ok(())
        }
        Command::Dlq(DlqCommand::Replay { error_type, topic_only, idle_ms, group }) => {
            let error_types = if error_type.is_empty() {
                dlq_replay::DEFAULT_ERROR_TYPES.iter().map(|t| t.to_string()).collect()
            } else {
                error_type
            };
            let options =
                dlq_replay::ReplayOptions { error_types, idle: std::time::Duration::from_millis(idle_ms), group };
            let db = (!topic_only).then_some(&config.db);
            let (replayed, skipped) = tokio_runtime()?.block_on(dlq_replay::run(&config.kafka, db, options))?;
            println!("replayed {replayed} skipped {skipped}");
            Ok(())
        }
        Command::Dlq(DlqCommand::List { error_type, all, limit }) => {
            let error_types = if error_type.is_empty() {
                ["invalid", "prediction_failed", "persist_failed"].iter().map(|t| t.to_string()).collect()
            } else {
                error_type
            };
            dlq_replay::list(&config.db, &error_types, !all, limit)
        }
        Command::Repredict(args) => {
            let selection = txnflow::domain::rollout::Selection::parse(
                args.since.as_deref(),
                args.until.as_deref(),
                args.from_model.as_deref(),
            )
            .map_err(|reason| anyhow::anyhow!("repredict: {reason}"))?;
            let mut config = config;
            if let Some(url) = &args.model_url {
                config.set_repredict_url("--model-url", url)?;
            }
            txnflow::cli::repredict::run_command(config, args.run_id, selection)
        }
        Command::Models(ModelsCommand::List) => txnflow::cli::models::list(&config),
        Command::Models(ModelsCommand::Compare { a, b, format }) => {
            txnflow::cli::models::compare(&config, &a, &b, format == "csv")
        }
        Command::Models(ModelsCommand::Promote { version }) => txnflow::cli::models::promote(&config, &version),
        Command::Models(ModelsCommand::History { id, limit, format }) => {
            txnflow::cli::models::history(&config, &id, limit, format == "json")
        }
        Command::Archive(ArchiveCommand::Predictions { older_than }) => {
            txnflow::cli::models::archive(&config, older_than)
        }
        Command::MlApi(args) => {
            let mut faults = config.ml_api.faults.clone();
            faults.error_rate = args.error_rate.unwrap_or(faults.error_rate);
            faults.latency_ms = args.latency_ms.unwrap_or(faults.latency_ms);
            faults.max_concurrent = args.max_concurrent.unwrap_or(faults.max_concurrent);
            faults.malformed_rate = args.malformed_rate.unwrap_or(faults.malformed_rate);
            faults.drop_rate = args.drop_rate.unwrap_or(faults.drop_rate);
            faults.extended |= args.extended;
            faults.poison_marker = args.poison_marker.unwrap_or(faults.poison_marker);
            faults.marker_status = args.status_for_marker.unwrap_or(faults.marker_status);
            faults.refuse_rate = args.refuse_rate.unwrap_or(faults.refuse_rate);
            faults.model_version = args.model_version.unwrap_or(faults.model_version);
            faults.shift = args.shift.unwrap_or(faults.shift);
            let endpoint = if args.faults { ml_api::FaultsEndpoint::Served } else { ml_api::FaultsEndpoint::Absent };
            let listen = args.listen.unwrap_or(config.ml_api.listen);
            actix_rt::System::new().block_on(async move {
                let running = ml_api::start(listen, faults.clone(), endpoint)?;
                tracing::info!(address = %running.address, "ml-api listening");
                running.server.await?;
                anyhow::Ok(())
            })
        }
    }
}

fn migrate(config: &Config) -> anyhow::Result<()> {
    let mut connection = db::connect(&config.db.url)?;
    let applied = db::migrate(&mut connection)?;
    if applied.is_empty() {
        println!("schema up to date");
    } else {
        println!("applied migrations: {}", applied.join(", "));
    }
    Ok(())
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
