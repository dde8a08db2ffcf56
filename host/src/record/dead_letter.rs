//! A dead letter: the original record plus why it failed (the `weir.error.*` fields), in one
//! shape for every DLQ: a JSON line in a file, headers on a Kafka record.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ErrorClass;
use super::Record;
use super::headers::{self, REPLAY_COUNT};
use super::json::RecordJson;

/// Why a record was dead-lettered. Every field is written as a UTF-8 string.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorInfo {
    pub class: ErrorClass,
    pub message: String,
    pub plugin: String,
    pub plugin_version: u64,
    pub plugin_digest: String,
    pub attempts: u32,
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
    pub source: String,
    pub partition: i32,
    pub offset: i64,
    pub backtrace: Option<String>,
    /// The idempotency id the record had, so a replay marks the same id done.
    pub record_id: String,
}

impl ErrorInfo {
    /// `(name, value)` pairs; prefix the names with `weir.error.` for headers.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("class", self.class.as_str().to_owned()),
            ("message", self.message.clone()),
            ("plugin", self.plugin.clone()),
            ("plugin_version", self.plugin_version.to_string()),
            ("plugin_digest", self.plugin_digest.clone()),
            ("attempts", self.attempts.to_string()),
            ("first_failure_ms", self.first_failure_ms.to_string()),
            ("last_failure_ms", self.last_failure_ms.to_string()),
            ("source", self.source.clone()),
            ("partition", self.partition.to_string()),
            ("offset", self.offset.to_string()),
            ("record_id", self.record_id.clone()),
        ];
        if let Some(bt) = &self.backtrace {
            fields.push(("backtrace", bt.clone()));
        }
        fields
    }

    /// Reads the fields back (from a DLQ file line).
    pub fn from_fields(fields: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |name: &str| {
            fields
                .get(name)
                .cloned()
                .ok_or_else(|| format!("error field `{name}` is missing"))
        };
        fn num<T: std::str::FromStr>(name: &str, value: String) -> Result<T, String> {
            value
                .parse()
                .map_err(|_| format!("error field `{name}` is not a number: `{value}`"))
        }
        let class = get("class")?;
        Ok(Self {
            class: ErrorClass::parse(&class)
                .ok_or_else(|| format!("unknown error class `{class}`"))?,
            message: get("message")?,
            plugin: get("plugin")?,
            plugin_version: num("plugin_version", get("plugin_version")?)?,
            plugin_digest: get("plugin_digest")?,
            attempts: num("attempts", get("attempts")?)?,
            first_failure_ms: num("first_failure_ms", get("first_failure_ms")?)?,
            last_failure_ms: num("last_failure_ms", get("last_failure_ms")?)?,
            source: get("source")?,
            partition: num("partition", get("partition")?)?,
            offset: num("offset", get("offset")?)?,
            backtrace: fields.get("backtrace").cloned(),
            record_id: get("record_id")?,
        })
    }
}

/// A record and why it failed.
#[derive(Debug)]
pub struct DeadLetter {
    pub record: Record,
    pub error: ErrorInfo,
}

impl DeadLetter {
    /// The record's own headers followed by the `weir.error.*` ones.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut headers = self.record.headers.clone();
        headers.extend(
            self.error
                .fields()
                .into_iter()
                .map(|(name, value)| (headers::error(name), value.into_bytes())),
        );
        headers
    }
}

/// One line of a DLQ file: `{"record": {...}, "error": {...}}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterLine {
    pub record: RecordJson,
    pub error: BTreeMap<String, String>,
}

impl DeadLetterLine {
    pub fn from_letter(letter: &DeadLetter) -> Self {
        let r = &letter.record;
        Self {
            record: RecordJson::encode(r.key.as_deref(), &r.value, &r.headers, r.timestamp_ms),
            error: letter
                .error
                .fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

/// How often a record has been replayed (its `weir.replay.count` header; 0 when absent).
pub fn replay_count(record: &Record) -> u32 {
    record
        .headers
        .iter()
        .rev()
        .find(|(name, _)| name == REPLAY_COUNT)
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Sets the `weir.replay.count` header.
pub fn set_replay_count(record: &mut Record, count: u32) {
    record.headers.retain(|(name, _)| name != REPLAY_COUNT);
    record
        .headers
        .push((REPLAY_COUNT.to_owned(), count.to_string().into_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ErrorInfo {
        ErrorInfo {
            class: ErrorClass::Trap,
            message: "boom".into(),
            plugin: "p".into(),
            plugin_version: 3,
            plugin_digest: "sha256:00".into(),
            attempts: 1,
            first_failure_ms: 5,
            last_failure_ms: 6,
            source: "/in.jsonl".into(),
            partition: 0,
            offset: 7,
            backtrace: Some("0: f".into()),
            record_id: "x".into(),
        }
    }

    #[test]
    fn fields_round_trip() {
        let map: BTreeMap<String, String> = info()
            .fields()
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect();
        assert_eq!(ErrorInfo::from_fields(&map).expect("parse"), info());
    }

    #[test]
    fn missing_field_is_named() {
        let mut map: BTreeMap<String, String> = info()
            .fields()
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect();
        map.remove("offset");
        assert!(ErrorInfo::from_fields(&map).unwrap_err().contains("offset"));
    }
}
