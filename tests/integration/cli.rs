//! The command line: configuration errors exit 2 naming the key.

use crate::helpers::{run, stderr, txnflow};

#[test]
fn a_bad_environment_value_exits_2_naming_the_key() {
    let output = run(txnflow().arg("migrate").env("TXNFLOW__BUFFER__MAX_RECORDS", "lots"));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("buffer.max_records"), "{}", stderr(&output));
}

/// An age past the bound is refused before anything runs, naming the
/// flag and its range, never a panic.
#[test]
fn an_archive_age_out_of_range_exits_2_naming_the_flag() {
    let output = run(txnflow().args(["archive", "predictions", "--older-than", "100000000"]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("--older-than") && message.contains("0..=36500"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

/// A database refusal that waiting will not change ends `txnflow run` and
/// `txnflow batch` with exit 1 and the key to fix, instead of waiting
/// forever; the password is never repeated.
#[test]
fn a_wrong_database_password_or_name_ends_run_and_batch_naming_db_url() {
    let seed = crate::helpers::seed_csv_path();
    let wrong_password = "postgres://txnflow:wrong-s3cret@127.0.0.1:5432/txnflow";
    let unknown_database = "postgres://txnflow:txnflow@127.0.0.1:5432/no_such_database_here";
    let cases = [
        (vec!["run"], wrong_password, "check the user and password of db.url"),
        (vec!["batch", seed.to_str().unwrap()], wrong_password, "check the user and password of db.url"),
        (vec!["run"], unknown_database, "check the database name of db.url"),
    ];
    for (args, url, fix) in cases {
        let mut child = txnflow()
            .args(&args)
            .env("TXNFLOW__DB__URL", url)
            .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{}", crate::helpers::free_port()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("txnflow {args:?} still waits after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let output = child.wait_with_output().unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {message}");
        assert!(message.contains(fix) && message.contains("Waiting will not change this"), "{args:?}: {message}");
        assert!(!message.contains("wrong-s3cret"), "{args:?}: the password is never repeated: {message}");
    }
}

/// No broker answers: librdkafka's retries are folded into one line per
/// cause and interval (30 s), and one line says what to check. Over 25 s
/// (the topics' creation gives up after 15), no line is said twice, and
/// that line is said once.
#[test]
fn brokers_that_are_down_are_said_once_per_cause_with_what_to_check() {
    let database = crate::helpers::TestDatabase::create();
    let log = std::env::temp_dir().join(format!("txnflow-down-{}.log", uuid::Uuid::new_v4().simple()));
    let mut child = txnflow()
        .arg("run")
        .env("TXNFLOW__KAFKA__BROKERS", "127.0.0.1:1")
        .env("TXNFLOW__DB__URL", &database.url)
        .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{}", crate::helpers::free_port()))
        .env("TXNFLOW__SHUTDOWN_TIMEOUT_MS", "5000")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(25));
    let _ = std::process::Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let lines: Vec<&str> = text.lines().collect();
    let actionable = lines.iter().filter(|line| line.contains("no broker of kafka.brokers answers")).count();
    assert_eq!(actionable, 1, "one line says what to check:\n{text}");
    let mut causes = std::collections::BTreeMap::<String, usize>::new();
    for line in &lines {
        *causes.entry(line.chars().filter(|c| !c.is_ascii_digit()).collect()).or_default() += 1;
    }
    let repeated: Vec<_> = causes.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "each line once in 25 s: {repeated:#?}");
    eprintln!("brokers down for 25 s: {} lines, all different", lines.len());
}

#[test]
fn an_unknown_environment_key_exits_2_naming_it() {
    let output = run(txnflow().arg("migrate").env("TXNFLOW__KAFKA__BROKER", "x:1"));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("kafka.broker (from TXNFLOW__KAFKA__BROKER)"), "{}", stderr(&output));
}

#[test]
fn a_bad_config_file_exits_2_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("txnflow-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[predict]\nbatch_sise = 10\n", "predict.batch_sise"),
        ("[predict]\nbatch_size = -1\n", "predict.batch_size"),
        ("[admin]\nlisten = \"localhost\"\n", "admin.listen"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("shutdown_timeout = 5\n", "shutdown_timeout"),
    ];
    for (index, (content, key)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("case{index}.toml"));
        std::fs::write(&file, content).unwrap();
        let output = run(txnflow().arg("--config").arg(&file).arg("migrate"));
        assert_eq!(output.status.code(), Some(2), "{content}");
        assert!(stderr(&output).contains(&format!("`{key}`")), "{content}: {}", stderr(&output));
    }
    let missing = run(txnflow().args(["--config", "/nonexistent/txnflow.toml", "migrate"]));
    assert_eq!(missing.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_database_is_a_clear_runtime_error() {
    let output = run(txnflow().arg("migrate").env("TXNFLOW__DB__URL", "postgres://txnflow:secret@127.0.0.1:1/none"));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains("cannot connect to PostgreSQL at postgres://txnflow:***@127.0.0.1:1/none"), "{message}");
    assert!(!message.contains("secret"), "the password is never printed");
}

/// `[kafka.properties]` is checked before any command that talks to Kafka:
/// a property librdkafka does not know or refuses, or one txnflow sets
/// itself, exits 2 naming it.
#[test]
fn an_unknown_or_invalid_librdkafka_property_exits_2_naming_it() {
    let cases = [
        ("TXNFLOW__KAFKA__PROPERTIES__NO_SUCH_THING", "1", "kafka.properties.no.such.thing"),
        ("TXNFLOW__KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS", "soon", "kafka.properties.socket.timeout.ms"),
        ("TXNFLOW__KAFKA__PROPERTIES__GROUP_ID", "other", "kafka.properties.group.id"),
    ];
    for (variable, value, key) in cases {
        let output = run(txnflow().arg("run").env(variable, value));
        assert_eq!(output.status.code(), Some(2), "{variable}: {}", stderr(&output));
        assert!(stderr(&output).contains(key), "{variable}: {}", stderr(&output));
    }
}

/// A command's error is said once, as one plain line on stderr: no
/// second copy from the log, no terminal colour codes.
#[test]
fn an_error_is_said_once_without_colour_codes() {
    let database = crate::helpers::TestDatabase::migrated();
    for args in [vec!["models", "promote", "v9"], vec!["models", "compare", "v9", "v9"]] {
        let output = run(txnflow().args(&args).env("TXNFLOW__DB__URL", &database.url));
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", stderr(&output));
        let message = stderr(&output);
        let said: Vec<&str> = message.lines().filter(|line| line.contains("has no prediction")).collect();
        assert_eq!(
            said,
            [r#"txnflow: model version "v9" has no prediction in prediction_history (see `txnflow models list`)"#],
            "{args:?}: {message}"
        );
        assert!(!message.contains('\u{1b}'), "{args:?}: no colour codes: {message:?}");
    }
}

/// Comparing with a version that has no prediction is an error, as
/// promoting it is, not "0 transactions predicted by both".
#[test]
fn comparing_a_version_without_predictions_exits_1_naming_it() {
    let database = crate::helpers::TestDatabase::migrated();
    let output = run(txnflow().args(["models", "compare", "v1", "v2"]).env("TXNFLOW__DB__URL", &database.url));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(crate::helpers::stdout(&output), "", "no table is printed");
    assert!(
        stderr(&output).lines().any(|line| line
            == r#"txnflow: model version "v1" has no prediction in prediction_history (see `txnflow models list`)"#),
        "{}",
        stderr(&output)
    );
}

/// Configuration errors in a user's words: a file is called a file and is
/// never quoted, a refused value says what was expected, and an unknown
/// name in an environment variable lists the valid ones.
#[test]
fn configuration_errors_are_in_plain_words() {
    let dir = std::env::temp_dir().join(format!("txnflow-words-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[db]\nurl = \"postgres://u:hunter2@h/db\"\npool_size = = 4\n").unwrap();
    let typed = dir.join("typed.toml");
    std::fs::write(&typed, "[buffer]\nmax_records = \"two thousand\"\n").unwrap();
    let variant = dir.join("variant.toml");
    std::fs::write(&variant, "[log]\nformat = \"xml\"\n").unwrap();
    let sections = "the sections are admin, backfill, batch, breaker, buffer, chaos, db, kafka, log, ml_api, predict, repredict, s3, schema_registry, tracing";
    // The arguments, the environment, and the whole of stderr.
    type Case = (Vec<String>, Vec<(&'static str, &'static str)>, String);
    let cases: Vec<Case> = vec![
        (
            vec!["--config".into(), broken.display().to_string()],
            vec![],
            format!(
                "txnflow: configuration file `{}`: not valid TOML at line 3, column 13: extra `=`, expected nothing",
                broken.display()
            ),
        ),
        (
            vec!["--config".into(), typed.display().to_string()],
            vec![],
            r#"txnflow: configuration key `buffer.max_records`: expected a whole number, 0 or more, got "two thousand""#.into(),
        ),
        (
            vec!["--config".into(), variant.display().to_string()],
            vec![],
            "txnflow: configuration key `log.format`: expected one of text, json, got xml".into(),
        ),
        (
            vec![],
            vec![("TXNFLOW__KAFAK__BROKERS", "x:1")],
            format!("txnflow: configuration key `kafak.brokers (from TXNFLOW__KAFAK__BROKERS)`: unknown key; {sections}, and the top-level keys shutdown_timeout_ms"),
        ),
        (
            vec![],
            vec![("TXNFLOW__LOG__FORMATS", "json")],
            "txnflow: configuration key `log.formats (from TXNFLOW__LOG__FORMATS)`: unknown key; the keys here are format, level".into(),
        ),
    ];
    for (args, env, expected) in cases {
        let output = run(txnflow().args(&args).arg("migrate").envs(env.iter().copied()));
        assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {}", stderr(&output));
        assert_eq!(stderr(&output).trim_end(), expected, "{args:?} {env:?}");
        assert!(!stderr(&output).contains("hunter2"), "the file is never quoted");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--help` reads like a well-kept tool's: examples, the environment
/// variables, and a description for every positional argument and flag.
#[test]
fn help_has_examples_the_environment_and_every_argument_described() {
    let top = crate::helpers::stdout(&run(txnflow().arg("--help")));
    for needed in ["Examples:", "txnflow batch s3://", "TXNFLOW__SECTION__KEY", "Exit status: 0 done, 1 failed"] {
        assert!(top.contains(needed), "top-level --help lacks {needed:?}:\n{top}");
    }
    let commands: [&[&str]; 6] = [
        &["batch"],
        &["repredict"],
        &["models", "compare"],
        &["models", "promote"],
        &["models", "history"],
        &["archive", "predictions"],
    ];
    for command in commands {
        let output = run(txnflow().args(command).arg("--help"));
        assert!(output.status.success(), "{command:?}");
        let help = crate::helpers::stdout(&output);
        // Every argument and option line gives its meaning after its name.
        for line in help.lines().filter(|line| line.trim_start().starts_with(['<', '-'])) {
            let described = line.trim_start().split_once("  ").is_some_and(|(_, text)| !text.trim().is_empty());
            assert!(described, "{command:?}: undescribed {line:?}:\n{help}");
        }
    }
    let repredict = crate::helpers::stdout(&run(txnflow().args(["repredict", "--help"])));
    assert!(repredict.contains("--model-url <URL>"), "{repredict}");
    let batch = crate::helpers::stdout(&run(txnflow().args(["batch", "--help"])));
    assert!(batch.contains("<dir>/errors/<run-id>.csv"), "batch --help says where the error file goes:\n{batch}");
}

/// `repredict --model-url` is checked as `repredict.url` is, and named.
#[test]
fn a_bad_model_url_exits_2_naming_the_flag() {
    let output = run(txnflow().args(["repredict", "--model-url", "ftp://model"]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).starts_with("txnflow: configuration key `--model-url`: "), "{}", stderr(&output));
}

/// `make run` (`scripts/run.sh`) names the admin address the service
/// listens on, whatever `admin.listen` is, and opens with the status
/// page's address and the token made for the run, which the page takes.
#[test]
fn make_run_names_the_admin_address_it_listens_on() {
    let database = crate::helpers::TestDatabase::migrated();
    let topic = format!("test-run-{}", uuid::Uuid::new_v4().simple());
    let port = crate::helpers::free_port();
    let log = std::env::temp_dir().join(format!("{topic}.log"));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/run.sh");
    let mut command = std::process::Command::new("bash");
    command.arg(&script);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("TXNFLOW__")) {
        command.env_remove(name);
    }
    let mut child = command
        .env("TXNFLOW__DB__URL", &database.url)
        .env("TXNFLOW__KAFKA__TOPIC", &topic)
        .env("TXNFLOW__KAFKA__DLQ_TOPIC", format!("{topic}-dlq"))
        .env("TXNFLOW__ADMIN__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let running = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) =
            text.lines().find(|line| line.contains("txnflow is running") && line.contains("metrics=http"))
        {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no \"txnflow is running\" line in 90 s:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // It opens with the status page's address and a token made for the run, which the page takes.
    let page = format!("http://127.0.0.1:{port}/");
    let banner = format!("[run] status page: {page} (sign in with the token ");
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.starts_with(&banner)) {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no {banner:?}:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let token = line[banner.len()..].split(' ').next().unwrap().to_string();
    assert_eq!(
        &line[banner.len() + token.len()..],
        " (made for this run; set TXNFLOW__ADMIN__TOKEN to choose one))",
        "{line}"
    );
    assert!(token.len() >= 24, "{token:?}");
    let client = reqwest::blocking::Client::new();
    let status = |token: Option<&str>| {
        let request = client.get(format!("{page}status.json"));
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        request.send().unwrap().status().as_u16()
    };
    assert_eq!((status(Some(&token)), status(None), status(Some("wrong"))), (200, 401, 401));
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let stopped = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(running.contains(&format!("page={page} metrics=http://127.0.0.1:{port}/metrics")), "{running}");
    assert!(!text.contains(":8088"), "no address but the configured one:\n{text}");
    assert!(stopped.success(), "run.sh stops cleanly:\n{text}");
}
