//! The ML API's request and the checks on its answer (guarantee 4).
//!
//! The API is outside our control: an answer may be malformed, miss items,
//! name ids we never asked about or invent categories. [`check_answer`] keeps
//! exactly the items that can be trusted and gives a reason for every
//! requested id that did not get a usable prediction.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

use super::transaction::{Transaction, format_timestamp};

/// One item of `POST /predict`. Every key is always present: the seed's
/// server requires `merchant` even when it is null.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PredictRequestItem {
    pub id: Uuid,
    pub description: String,
    pub amount: f64,
    pub timestamp: String,
    pub merchant: Option<String>,
    pub operation_type: String,
    pub side: String,
}

impl PredictRequestItem {
    /// A valid item, the seed file's first row under `id`: what
    /// `txnflow check` asks the ML API, and the benchmarks' request.
    pub fn example(id: Uuid) -> PredictRequestItem {
        PredictRequestItem {
            id,
            description: "Card expense at EDF".into(),
            amount: -952.4,
            timestamp: "2023-11-28T06:35:12".into(),
            merchant: Some("EDF".into()),
            operation_type: "payment".into(),
            side: "debit".into(),
        }
    }
}

impl From<&Transaction> for PredictRequestItem {
    fn from(transaction: &Transaction) -> Self {
        PredictRequestItem {
            id: transaction.id,
            description: transaction.description.clone(),
            amount: transaction.amount.cents() as f64 / 100.0,
            timestamp: format_timestamp(&transaction.timestamp),
            merchant: transaction.merchant.clone(),
            operation_type: transaction.operation_type.clone(),
            side: transaction.side.as_str().to_string(),
        }
    }
}

/// A prediction ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub transaction_id: Uuid,
    pub category: String,
    pub confidence_score: f64,
    pub model_version: String,
}

/// How a prediction was made, as `prediction_history.kind` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionKind {
    /// In a flush of the streaming or batch path.
    Pipeline,
    /// By the Backfill actor, for a transaction stored without one.
    Backfill,
    /// By a re-prediction run (`txnflow repredict`), into history only.
    Repredict,
    /// By the shadow model beside the live one, into history only.
    Shadow,
}

impl PredictionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionKind::Pipeline => "pipeline",
            PredictionKind::Backfill => "backfill",
            PredictionKind::Repredict => "repredict",
            PredictionKind::Shadow => "shadow",
        }
    }
}

/// The outcome of checking one answer against one request.
#[derive(Debug, Default, PartialEq)]
pub struct CheckedAnswer {
    /// Trusted predictions, in the answer's order.
    pub predicted: Vec<Prediction>,
    /// Requested ids without a usable prediction, in request order, with the reason.
    pub failed: Vec<(Uuid, String)>,
    /// Items that could not be attributed to a requested id; only logged.
    pub unattributed: usize,
}

/// The longest model version stored (the `predictions.model_version` column).
pub const MODEL_VERSION_MAX_CHARS: usize = 50;

/// The most bytes one valid answer item can take: a 36-character id, a
/// 100-character category and a 50-character version, every character
/// escaped as `\uXXXX` (6 bytes), a confidence written out in full, the
/// keys and the punctuation.
pub const LARGEST_ANSWER_ITEM_BYTES: usize = 1_100;

/// The most bytes a valid answer to `batch_size` items can take.
pub fn largest_valid_answer_bytes(batch_size: usize) -> usize {
    batch_size.saturating_mul(LARGEST_ANSWER_ITEM_BYTES).saturating_add(2)
}

/// What the checks need besides the answer.
pub struct AnswerRules<'a> {
    pub categories: &'a HashSet<String>,
    pub default_model_version: &'a str,
}

/// Checks an answer body (the raw bytes of a 200 response) against the ids
/// that were requested. A body that is not a JSON array fails every id.
pub fn check_answer(requested: &[Uuid], body: &[u8], rules: &AnswerRules<'_>) -> CheckedAnswer {
    let items = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(items)) => items,
        Ok(_) => return fail_all(requested, "malformed answer: expected a JSON array"),
        Err(error) => return fail_all(requested, &format!("malformed answer: {error}")),
    };
    let wanted: HashSet<Uuid> = requested.iter().copied().collect();
    let mut verdicts: HashMap<Uuid, Result<(), String>> = HashMap::with_capacity(requested.len());
    let mut checked = CheckedAnswer::default();
    for item in &items {
        let Some(id) = item.get("transaction_id").and_then(|v| v.as_str()).and_then(|s| Uuid::try_parse(s).ok()) else {
            checked.unattributed += 1;
            continue;
        };
        if !wanted.contains(&id) || verdicts.contains_key(&id) {
            // Not asked for, or a repeat: the first item for an id decides.
            checked.unattributed += 1;
            continue;
        }
        let verdict = check_item(id, item, rules).map(|prediction| checked.predicted.push(prediction));
        verdicts.insert(id, verdict);
    }
    for id in requested {
        match verdicts.get(id) {
            Some(Ok(())) => {}
            Some(Err(reason)) => checked.failed.push((*id, reason.clone())),
            None => checked.failed.push((*id, "missing from the answer".to_string())),
        }
    }
    checked
}

fn check_item(id: Uuid, item: &serde_json::Value, rules: &AnswerRules<'_>) -> Result<Prediction, String> {
    let category = match item.get("category") {
        Some(serde_json::Value::String(category)) if rules.categories.contains(category) => category.clone(),
        Some(serde_json::Value::String(category)) => {
            return Err(format!("unknown category {category:?}"));
        }
        _ => return Err("category missing or not text".to_string()),
    };
    let confidence_score = match item.get("confidence_score") {
        None | Some(serde_json::Value::Null) => 1.0,
        Some(value) => match value.as_f64() {
            Some(score) if (0.0..=1.0).contains(&score) => score,
            _ => return Err(format!("confidence_score not in [0, 1]: {value}")),
        },
    };
    let model_version = match item.get("model_version") {
        None | Some(serde_json::Value::Null) => rules.default_model_version.to_string(),
        Some(serde_json::Value::String(version)) if version.chars().count() > MODEL_VERSION_MAX_CHARS => {
            return Err(format!(
                "model_version longer than {MODEL_VERSION_MAX_CHARS} characters ({})",
                version.chars().count()
            ));
        }
        Some(serde_json::Value::String(version)) if !version.is_empty() => version.clone(),
        Some(value) => return Err(format!("model_version not a non-empty text: {value}")),
    };
    Ok(Prediction { transaction_id: id, category, confidence_score, model_version })
}

fn fail_all(requested: &[Uuid], reason: &str) -> CheckedAnswer {
    CheckedAnswer { failed: requested.iter().map(|id| (*id, reason.to_string())).collect(), ..CheckedAnswer::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::categories::CATEGORIES;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    fn check(requested: &[Uuid], body: serde_json::Value) -> CheckedAnswer {
        let categories: HashSet<String> = CATEGORIES.iter().map(|c| c.to_string()).collect();
        let rules = AnswerRules { categories: &categories, default_model_version: "v-default" };
        check_answer(requested, body.to_string().as_bytes(), &rules)
    }

    fn failed_ids(answer: &CheckedAnswer) -> Vec<Uuid> {
        answer.failed.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn the_short_form_gets_default_confidence_and_version() {
        let [a] = ids(1)[..] else { unreachable!() };
        let answer = check(&[a], serde_json::json!([{"transaction_id": a, "category": "Food"}]));
        assert_eq!(
            answer.predicted,
            [Prediction {
                transaction_id: a,
                category: "Food".into(),
                confidence_score: 1.0,
                model_version: "v-default".into()
            }]
        );
        assert!(answer.failed.is_empty());
    }

    #[test]
    fn the_long_form_is_kept() {
        let a = Uuid::from_u128(9);
        let answer = check(
            &[a],
            serde_json::json!([{"transaction_id": a, "category": "Rent", "confidence_score": 0.25, "model_version": "m2"}]),
        );
        assert_eq!(answer.predicted[0].confidence_score, 0.25);
        assert_eq!(answer.predicted[0].model_version, "m2");
    }

    #[test]
    fn a_model_version_longer_than_its_column_fails_the_item() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let long = "v".repeat(300);
        let answer = check(
            &[a, b],
            serde_json::json!([
                {"transaction_id": a, "category": "Rent", "model_version": long},
                {"transaction_id": b, "category": "Rent", "model_version": "v".repeat(50)},
            ]),
        );
        assert_eq!(answer.failed, [(a, "model_version longer than 50 characters (300)".to_string())]);
        assert_eq!(answer.predicted.len(), 1);
    }

    #[test]
    fn bad_items_and_missing_ids_fail_one_by_one() {
        let requested = ids(6);
        let answer = check(
            &requested,
            serde_json::json!([
                {"transaction_id": requested[0], "category": "Food"},
                {"transaction_id": requested[1], "category": "Spaceships"},
                {"transaction_id": requested[2], "category": "Food", "confidence_score": 1.5},
                {"transaction_id": requested[3]},
                {"transaction_id": Uuid::from_u128(999), "category": "Food"},
                {"transaction_id": requested[5], "category": "Food", "model_version": 3},
                {"transaction_id": requested[0], "category": "Rent"},
                {"category": "Food"},
            ]),
        );
        assert_eq!(answer.predicted.iter().map(|p| p.transaction_id).collect::<Vec<_>>(), [requested[0]]);
        assert_eq!(answer.predicted[0].category, "Food", "the first item for an id decides");
        assert_eq!(failed_ids(&answer), requested[1..].to_vec());
        assert_eq!(answer.failed[0].1, "unknown category \"Spaceships\"");
        assert!(answer.failed[1].1.starts_with("confidence_score not in [0, 1]"));
        assert_eq!(answer.failed[3].1, "missing from the answer");
        assert_eq!(answer.unattributed, 3);
    }

    #[test]
    fn a_malformed_body_fails_every_id() {
        let requested = ids(3);
        let categories: HashSet<String> = HashSet::new();
        let rules = AnswerRules { categories: &categories, default_model_version: "v" };
        for body in [&b"{oops"[..], b"{\"a\":1}", b""] {
            let answer = check_answer(&requested, body, &rules);
            assert_eq!(failed_ids(&answer), requested);
            assert!(answer.failed[0].1.starts_with("malformed answer"));
        }
    }

    #[test]
    fn request_items_carry_every_key() {
        let transaction = crate::domain::event::parse_event(
            br#"{"id":"7","description":"d","amount":-1.5,"timestamp":"2026-01-11 10:00:00","operation_type":"payment","side":"debit"}"#,
        )
        .unwrap();
        let json = serde_json::to_value(PredictRequestItem::from(&transaction)).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 7, "{keys:?}");
        assert_eq!(json["merchant"], serde_json::Value::Null);
        assert_eq!(json["amount"], serde_json::json!(-1.5));
        assert_eq!(json["timestamp"], "2026-01-11T10:00:00.000000Z");
    }
}
