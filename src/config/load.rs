//! Loading: the layers, merged in order, then the secrets read from their
//! files, then [`Config::check`](super::Config).

use std::path::Path;

use super::{Config, ConfigError, DEFAULTS_TOML, ENV_PREFIX, LOCAL_FILE};

impl Config {
    /// Loads the layers from the process environment and working directory.
    pub fn load(config_file: Option<&Path>) -> Result<Config, ConfigError> {
        let local = Path::new(LOCAL_FILE);
        let local = local.exists().then_some(local);
        Config::from_layers(local.into_iter().chain(config_file), std::env::vars())
    }

    /// Loads the defaults, then each file in order, then the environment.
    pub fn from_layers<'a>(
        files: impl IntoIterator<Item = &'a Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let defaults: toml::Table = DEFAULTS_TOML.parse().expect("config/default.toml is valid TOML");
        let mut merged = defaults.clone();
        for file in files {
            let name = file.display().to_string();
            let text =
                std::fs::read_to_string(file).map_err(|e| ConfigError::file(&name, format!("cannot read: {e}")))?;
            let table: toml::Table = text.parse().map_err(|e| ConfigError::file(&name, toml_error(&text, &e)))?;
            merge(&mut merged, table);
        }
        let mut overrides: Vec<(String, String)> =
            env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
        overrides.sort();
        for (name, value) in overrides {
            apply_env(&defaults, &mut merged, &name, &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|error| {
            let key = error.path().to_string();
            ConfigError::new(key, in_plain_words(error.into_inner().message()))
        })?;
        let mut config = config;
        config.read_secret_files()?;
        config.check()?;
        Ok(config)
    }

    /// Fills the secrets given as files (`*_file` keys), trimmed.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let kafka = &mut self.kafka;
        if !kafka.sasl_password_file.is_empty() {
            if !kafka.sasl_password.is_empty() {
                return Err(ConfigError::new(
                    "kafka.sasl_password_file",
                    "set kafka.sasl_password or kafka.sasl_password_file, not both",
                ));
            }
            let path = &kafka.sasl_password_file;
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("kafka.sasl_password_file", format!("cannot read {path}: {e}")))?;
            kafka.sasl_password = text.trim().to_string();
            if kafka.sasl_password.is_empty() {
                return Err(ConfigError::new("kafka.sasl_password_file", format!("{path} is empty")));
            }
        }
        let registry = &mut self.schema_registry;
        for (key, file, secret, other) in [
            (
                "schema_registry.password_file",
                &registry.password_file,
                &mut registry.password,
                "schema_registry.password",
            ),
            ("schema_registry.token_file", &registry.token_file, &mut registry.token, "schema_registry.token"),
        ] {
            if file.is_empty() {
                continue;
            }
            if !secret.is_empty() {
                return Err(ConfigError::new(key, format!("set {other} or {key}, not both")));
            }
            let text =
                std::fs::read_to_string(file).map_err(|e| ConfigError::new(key, format!("cannot read {file}: {e}")))?;
            *secret = text.trim().to_string();
            if secret.is_empty() {
                return Err(ConfigError::new(key, format!("{file} is empty")));
            }
        }
        let admin = &mut self.admin;
        if !admin.token_file.is_empty() {
            if !admin.token.is_empty() {
                return Err(ConfigError::new("admin.token_file", "set admin.token or admin.token_file, not both"));
            }
            // The error names the file, never its content.
            let text = std::fs::read_to_string(&admin.token_file)
                .map_err(|e| ConfigError::new("admin.token_file", format!("cannot read {}: {e}", admin.token_file)))?;
            admin.token = text.trim().to_string();
            if admin.token.is_empty() {
                return Err(ConfigError::new("admin.token_file", format!("{} is empty", admin.token_file)));
            }
        }
        Ok(())
    }
}

/// Where a file's TOML goes wrong and why, without quoting the file: its
/// lines may hold secrets.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let why = error.message().trim_end();
    match error.span() {
        Some(span) => {
            // The span is in bytes: back to a character's start, never a panic.
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("not valid TOML at line {line}, column {column}: {why}")
        }
        None => format!("not valid TOML: {why}"),
    }
}

/// serde's wording of a refused value, in a user's words: "invalid type:
/// string \"x\", expected usize" becomes "expected a whole number, got
/// \"x\"".
fn in_plain_words(message: &str) -> String {
    let expected_words = |expected: &str| -> String {
        match expected.trim() {
            "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number, 0 or more".into(),
            "i64" | "i32" | "i16" | "i8" | "isize" => "a whole number".into(),
            "f64" | "f32" => "a number".into(),
            "a boolean" => "true or false".into(),
            "a string" => "text in quotes".into(),
            other => other.to_string(),
        }
    };
    // "unknown field `x`, expected one of `a`, `b`" (or "expected `a`"), and
    // "unknown variant `x`, expected `a` or `b`".
    let listed = |expected: &str| expected.trim_start_matches("one of ").replace('`', "").replace(" or ", ", ");
    if let Some(rest) = message.strip_prefix("unknown field ")
        && let Some((_, expected)) = rest.split_once(", expected ")
    {
        return format!("unknown key; the keys here are {}", listed(expected));
    }
    if let Some(rest) = message.strip_prefix("unknown variant ")
        && let Some((got, expected)) = rest.split_once(", expected ")
    {
        return format!("expected one of {}, got {}", listed(expected), got.trim_matches('`'));
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((got, expected)) = rest.rsplit_once(", expected ")
        {
            let got = got
                .trim_start_matches("string ")
                .trim_start_matches("integer ")
                .trim_start_matches("floating point ")
                .trim_start_matches("boolean ")
                .trim_matches('`');
            return format!("expected {}, got {got}", expected_words(expected));
        }
    }
    message.to_string()
}

/// Deep-merges `overlay` into `base`: tables merge, any other value replaces.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `TXNFLOW__SECTION__KEY=value`, typed like the key's default.
fn apply_env(defaults: &toml::Table, merged: &mut toml::Table, name: &str, text: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
    let dotted = path.join(".");
    // `TXNFLOW__KAFKA__PROPERTIES__SOCKET_KEEPALIVE_ENABLE=true` sets
    // librdkafka's `socket.keepalive.enable`: its names use dots only.
    if let [section, properties, property] = path.as_slice()
        && section == "kafka"
        && properties == "properties"
    {
        let table = merged
            .get_mut("kafka")
            .and_then(toml::Value::as_table_mut)
            .and_then(|kafka| kafka.get_mut("properties"))
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(|| ConfigError::new(dotted.clone(), "kafka.properties is not a table"))?;
        table.insert(property.replace('_', "."), toml::Value::String(text.to_string()));
        return Ok(());
    }
    // An unknown name lists what is valid where it went wrong.
    let unknown = |table: &toml::Table, top: bool| {
        let (mut sections, mut keys) = (Vec::new(), Vec::new());
        for (key, value) in table {
            if value.is_table() { sections.push(key.as_str()) } else { keys.push(key.as_str()) }
        }
        let message = if top {
            format!("unknown key; the sections are {}, and the top-level keys {}", sections.join(", "), keys.join(", "))
        } else {
            keys.extend(sections);
            format!("unknown key; the keys here are {}", keys.join(", "))
        };
        ConfigError::new(format!("{dotted} (from {name})"), message)
    };
    let Some((leaf, sections)) = path.split_last() else { return Err(unknown(defaults, true)) };
    let mut default_table = defaults;
    let mut target = merged;
    for (depth, section) in sections.iter().enumerate() {
        let Some(next) = default_table.get(section).and_then(toml::Value::as_table) else {
            return Err(unknown(default_table, depth == 0));
        };
        default_table = next;
        target = target.get_mut(section).and_then(toml::Value::as_table_mut).ok_or_else(|| unknown(next, false))?;
    }
    let default = default_table.get(leaf).ok_or_else(|| unknown(default_table, sections.is_empty()))?;
    let bad = |expected: &str| {
        ConfigError::new(format!("{dotted} (from {name})"), format!("expected {expected}, got {text:?}"))
    };
    let value = match default {
        toml::Value::String(_) => toml::Value::String(text.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(text.trim().parse().map_err(|_| bad("a whole number"))?),
        toml::Value::Float(_) => toml::Value::Float(text.trim().parse().map_err(|_| bad("a number"))?),
        toml::Value::Boolean(_) => toml::Value::Boolean(text.trim().parse().map_err(|_| bad("true or false"))?),
        toml::Value::Array(_) => {
            // A TOML array (`["a", "b"]`) or a comma-separated list (`a,b`).
            match format!("v = {text}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")) {
                Some(array @ toml::Value::Array(_)) => array,
                _ => toml::Value::Array(
                    text.split(',').map(|item| toml::Value::String(item.trim().to_string())).collect(),
                ),
            }
        }
        toml::Value::Table(_) => {
            return Err(ConfigError::new(format!("{dotted} (from {name})"), "is a section, not a key"));
        }
        toml::Value::Datetime(_) => toml::Value::String(text.to_string()),
    };
    target.insert(leaf.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::GroupProtocol;
    use super::super::test_support::load_with;

    #[test]
    fn the_defaults_are_complete_and_valid() {
        let config = load_with(&[], &[]).unwrap();
        assert_eq!(config.kafka.brokers, "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094");
        assert_eq!(config.kafka.group_id, "txnflow");
        assert_eq!(config.db.url, "postgres://txnflow:txnflow@127.0.0.1:5432/txnflow");
        assert_eq!(config.predict.categories.len(), 15);
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:8088");
    }

    #[test]
    fn environment_overrides_are_typed_by_the_default() {
        let config = load_with(
            &[],
            &[
                ("TXNFLOW__KAFKA__BROKERS", "k1:9092,k2:9092"),
                ("TXNFLOW__BUFFER__MAX_RECORDS", "42"),
                ("TXNFLOW__CHAOS__ENABLED", "true"),
                ("TXNFLOW__ML_API__FAULTS__ERROR_RATE", "0.25"),
                ("TXNFLOW__PREDICT__CATEGORIES", "Food, Rent"),
                ("TXNFLOW__SHUTDOWN_TIMEOUT_MS", "5"),
                ("OTHER", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(config.buffer.max_records, 42);
        assert!(config.chaos.enabled);
        assert_eq!(config.ml_api.faults.error_rate, 0.25);
        assert_eq!(config.predict.categories, ["Food", "Rent"]);
        assert_eq!(config.shutdown_timeout_ms, 5);
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let error = load_with(&[], &[("TXNFLOW__KAFKA__BROKER", "x")]).unwrap_err();
        assert_eq!(error.key, "kafka.broker (from TXNFLOW__KAFKA__BROKER)");
        let error = load_with(&[], &[("TXNFLOW__BUFFER__MAX_RECORDS", "many")]).unwrap_err();
        assert!(error.to_string().starts_with("configuration key `buffer.max_records"), "{error}");
        let error = load_with(&[], &[("TXNFLOW__BUFFER__MAX_RECORDS", "0")]).unwrap_err();
        assert_eq!(error.key, "buffer.max_records");
        let error = load_with(&[], &[("TXNFLOW__ADMIN__LISTEN", "nowhere")]).unwrap_err();
        assert_eq!(error.key, "admin.listen");
        let error = load_with(&[], &[("TXNFLOW__BREAKER__FAILURE_RATE", "1.5")]).unwrap_err();
        assert_eq!(error.key, "breaker.failure_rate");
        let error = load_with(&[], &[("TXNFLOW__KAFKA__GROUP_PROTOCOL", "cooperative")]).unwrap_err();
        assert!(error.to_string().starts_with("configuration key `kafka.group_protocol"), "{error}");
        let config = load_with(&[], &[("TXNFLOW__KAFKA__GROUP_PROTOCOL", "consumer")]).unwrap();
        assert_eq!(config.kafka.group_protocol, GroupProtocol::Consumer);
    }

    /// A file that is not TOML is located by line and character column,
    /// and never quoted.
    #[test]
    fn a_toml_error_names_its_line_and_column_without_quoting_the_file() {
        let text = "[db]\nurl = \"postgres://u:pässword@h/db\" x\n";
        let error = text.parse::<toml::Table>().unwrap_err();
        let said = super::toml_error(text, &error);
        assert!(said.starts_with("not valid TOML at line 2, column 36: "), "{said}");
        assert!(!said.contains("pässword"), "{said}");
    }

    /// A refused value is quoted with its password hidden.

    #[test]
    fn the_token_can_come_from_a_file_whose_content_is_never_repeated() {
        let dir = std::env::temp_dir().join(format!("txnflow-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "0123456789abcdef-from-file\n").unwrap();
        let path = file.display().to_string();
        let config = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN_FILE", &path)]).unwrap();
        assert_eq!(config.admin.token, "0123456789abcdef-from-file");
        let missing = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN_FILE", "/nonexistent/token")]).unwrap_err();
        assert_eq!(missing.key, "admin.token_file");
        let both = load_with(
            &[],
            &[("TXNFLOW__ADMIN__TOKEN_FILE", &path), ("TXNFLOW__ADMIN__TOKEN", "x".repeat(20).as_str())],
        );
        assert_eq!(both.unwrap_err().key, "admin.token_file");
        std::fs::write(&file, "short\n").unwrap();
        let error = load_with(&[], &[("TXNFLOW__ADMIN__TOKEN_FILE", &path)]).unwrap_err();
        assert_eq!(error.key, "admin.token");
        assert!(!error.to_string().contains("short"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn librdkafka_properties_come_from_files_and_the_environment() {
        let dir = std::env::temp_dir().join(format!("txnflow-props-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("props.toml");
        std::fs::write(&file, "[kafka.properties]\n\"socket.keepalive.enable\" = true\n\"fetch.wait.max.ms\" = 250\n")
            .unwrap();
        let config = load_with(&[&file], &[("TXNFLOW__KAFKA__PROPERTIES__METADATA_MAX_AGE_MS", "60000")]).unwrap();
        let properties: Vec<(&str, &str)> =
            config.kafka.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            properties,
            [("fetch.wait.max.ms", "250"), ("metadata.max.age.ms", "60000"), ("socket.keepalive.enable", "true")]
        );
        let managed = load_with(&[], &[("TXNFLOW__KAFKA__PROPERTIES__ENABLE_AUTO_COMMIT", "true")]).unwrap_err();
        assert_eq!(managed.key, "kafka.properties.enable.auto.commit");
        // The group protocol has a key of its own, kafka.group_protocol.
        let managed = load_with(&[], &[("TXNFLOW__KAFKA__PROPERTIES__GROUP_PROTOCOL", "consumer")]).unwrap_err();
        assert_eq!(managed.key, "kafka.properties.group.protocol");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_layer_in_order_and_unknown_file_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("txnflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = dir.join("first.toml");
        let second = dir.join("second.toml");
        std::fs::write(&first, "[buffer]\nmax_records = 7\nmax_wait_ms = 9\n").unwrap();
        std::fs::write(&second, "[buffer]\nmax_records = 8\n").unwrap();
        let config = load_with(&[&first, &second], &[]).unwrap();
        assert_eq!((config.buffer.max_records, config.buffer.max_wait_ms), (8, 9));

        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "[db]\npool_sise = 3\n").unwrap();
        let error = load_with(&[&typo], &[]).unwrap_err();
        assert_eq!(error.key, "db.pool_sise");

        let wrong_type = dir.join("wrong_type.toml");
        std::fs::write(&wrong_type, "[db]\npool_size = \"four\"\n").unwrap();
        assert_eq!(load_with(&[&wrong_type], &[]).unwrap_err().key, "db.pool_size");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
