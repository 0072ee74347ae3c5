//! Secrets hidden from anything txnflow says: error messages, answers and
//! log lines name a URL or a setting, never its password.

/// `text` with its secrets hidden, for messages and logs: the password of
/// any URL's user info (`scheme://user:***@host`), and the value of any
/// `password=`, `secret=` or `token=`-style parameter (URL query or libpq
/// keyword string).
pub fn redact(text: &str) -> String {
    hide_parameter_values(&hide_url_passwords(text))
}

fn hide_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        let authority_end =
            rest.find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace()).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user_info = &authority[..at];
                match user_info.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str(user_info),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    out
}

/// Keys whose values are secrets, matched at the end of a parameter name
/// (`password`, `sasl.password`, `secret_key`, `access_token`, ...).
const SECRET_KEYS: [&str; 6] = ["password", "passwd", "pwd", "secret", "secret_key", "token"];

fn hide_parameter_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(equals) = rest.find('=') {
        let name_start = rest[..equals]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .map_or(0, |i| i + 1);
        let name = rest[name_start..equals].to_ascii_lowercase();
        out.push_str(&rest[..=equals]);
        rest = &rest[equals + 1..];
        if SECRET_KEYS
            .iter()
            .any(|key| name == *key || name.ends_with(&format!(".{key}")) || name.ends_with(&format!("_{key}")))
        {
            let value_end = match rest.chars().next() {
                // A quoted libpq value: up to its closing quote.
                Some(quote @ ('\'' | '"')) => rest[1..].find(quote).map_or(rest.len(), |i| i + 2),
                _ => rest.find(|c: char| c == '&' || c == ';' || c == ',' || c.is_whitespace()).unwrap_or(rest.len()),
            };
            out.push_str("***");
            rest = &rest[value_end..];
        }
    }
    out.push_str(rest);
    out
}

/// An error for an answer or a log line: secrets hidden, at most 200 characters.
pub fn short_reason(error: impl std::fmt::Display) -> String {
    let text = redact(&error.to_string());
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// A dead letter's reason with every quoted part replaced by `"…"` or
/// `` `…` ``: decoders quote the values they refuse, in double quotes
/// (with `\"` inside) or in backticks. A page that lists dead letters
/// shows why and where, never what a record held.
pub fn without_quoted_values(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut chars = reason.chars();
    while let Some(c) = chars.next() {
        if c != '"' && c != '`' {
            out.push(c);
            continue;
        }
        // Up to the closing quote of the same kind; a backslash escapes the next character.
        let mut closed = false;
        while let Some(inner) = chars.next() {
            match inner {
                '\\' => {
                    chars.next();
                }
                _ if inner == c => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        out.push(c);
        out.push('…');
        if closed {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{redact, without_quoted_values};

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://txnflow:secret@db:5432/x"), "postgres://txnflow:***@db:5432/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact("postgres://txnflow@db/x"), "postgres://txnflow@db/x");
        assert_eq!(
            redact("cannot reach postgres://u:p@a/x, then https://k:s3cr@t@b:9/y?q=1"),
            "cannot reach postgres://u:***@a/x, then https://k:***@b:9/y?q=1"
        );
        assert_eq!(
            redact("postgres://db/x?sslmode=require&password=hunter2&user=u"),
            "postgres://db/x?sslmode=require&password=***&user=u"
        );
        assert_eq!(redact("host=db password='x y' user=u"), "host=db password=*** user=u");
        assert_eq!(
            redact("sasl.password=abc secret_key=def access_token=ghi a=b"),
            "sasl.password=*** secret_key=*** access_token=*** a=b"
        );
        assert_eq!(redact("no secrets: x=1"), "no secrets: x=1");
    }

    #[test]
    fn a_reason_keeps_no_quoted_value() {
        assert_eq!(
            without_quoted_values(r#"amount: invalid type: string "SECRET-42", expected a number"#),
            r#"amount: invalid type: string "…", expected a number"#
        );
        assert_eq!(without_quoted_values(r#"two "a" and "b""#), r#"two "…" and "…""#);
        assert_eq!(without_quoted_values(r#"cut "off"#), r#"cut "…"#);
        assert_eq!(without_quoted_values(r#"debug "ab\"cd" escaped"#), r#"debug "…" escaped"#);
        assert_eq!(
            without_quoted_values("unknown variant `refundx`, expected `refund` or `transfer`"),
            "unknown variant `…`, expected `…` or `…`"
        );
        assert_eq!(
            without_quoted_values("invalid value: integer `-5`, expected u32"),
            "invalid value: integer `…`, expected u32"
        );
        assert_eq!(
            without_quoted_values("malformed JSON: expected value at line 1 column 1"),
            "malformed JSON: expected value at line 1 column 1"
        );
    }
}
