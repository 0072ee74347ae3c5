//! The command line: configuration errors exit 2 naming the key.

use crate::helpers::{run, stderr, txnflow};

#[test]
fn a_bad_environment_value_exits_2_naming_the_key() {
    let output = run(txnflow().arg("migrate").env("TXNFLOW__BUFFER__MAX_RECORDS", "lots"));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("buffer.max_records"), "{}", stderr(&output));
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
