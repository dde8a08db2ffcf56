//! Record ids for deduplication: the configured idempotency key, else the source position.

use crate::runtime::Record;

/// Where a record's idempotency key lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSpec {
    /// A JSON pointer into the value, such as `/id` or `/meta/event_id`.
    Pointer(String),
    /// A header, `header:<name>`.
    Header(String),
    /// The record key, `key`.
    Key,
}

impl IdSpec {
    pub fn parse(spec: &str) -> Result<Self, String> {
        if spec.starts_with('/') {
            Ok(Self::Pointer(spec.to_owned()))
        } else if let Some(name) = spec.strip_prefix("header:").filter(|n| !n.is_empty()) {
            Ok(Self::Header(name.to_owned()))
        } else if spec == "key" {
            Ok(Self::Key)
        } else {
            Err(format!(
                "`{spec}` is not an id: use a JSON pointer such as /id, header:<name>, or key"
            ))
        }
    }

    /// The key, when the record has a non-empty one.
    pub fn extract(&self, record: &Record) -> Option<String> {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let id = match self {
            Self::Pointer(pointer) => {
                let value: serde_json::Value = serde_json::from_slice(&record.value).ok()?;
                match value.pointer(pointer)? {
                    serde_json::Value::Null => return None,
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }
            }
            Self::Header(name) => text(&record.headers.iter().rev().find(|(n, _)| n == name)?.1),
            Self::Key => text(record.key.as_deref()?),
        };
        (!id.is_empty()).then_some(id)
    }
}

/// The id of a record: its key per `spec`, else `stream:partition:offset`. A record
/// re-published from a DLQ topic (`weir.replay.count` = n) gets `#replay<n>` appended, so it
/// bypasses the original's done mark on purpose and a replay run twice is still deduplicated.
pub fn record_id(spec: Option<&IdSpec>, record: &Record) -> String {
    let id = spec.and_then(|s| s.extract(record)).unwrap_or_else(|| {
        let s = &record.source;
        format!("{}:{}:{}", s.stream, s.partition, s.offset)
    });
    match super::dead_letter::replay_count(record) {
        0 => id,
        n => format!("{id}#replay{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::SourceMeta;

    fn record(value: &str) -> Record {
        Record {
            key: Some(b"k1".to_vec()),
            value: value.as_bytes().to_vec(),
            headers: vec![("h".into(), b"v1".to_vec())],
            timestamp_ms: None,
            source: SourceMeta {
                stream: "in".into(),
                partition: 0,
                offset: 9,
                attempt: 1,
            },
        }
    }

    #[test]
    fn every_kind_of_key() {
        let r = record(r#"{"id":"a","n":7,"deep":{"x":true}}"#);
        let id = |spec: &str| record_id(Some(&IdSpec::parse(spec).expect("spec")), &r);
        assert_eq!(id("/id"), "a");
        assert_eq!(id("/n"), "7");
        assert_eq!(id("/deep/x"), "true");
        assert_eq!(id("header:h"), "v1");
        assert_eq!(id("key"), "k1");
        assert_eq!(id("/missing"), "in:0:9");
        assert_eq!(record_id(None, &r), "in:0:9");
        assert_eq!(record_id(Some(&IdSpec::Key), &record("not json")), "k1");
        let spec = IdSpec::parse("/id").expect("spec");
        assert_eq!(record_id(Some(&spec), &record("not json")), "in:0:9");
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!(IdSpec::parse("id").unwrap_err().contains("JSON pointer"));
        assert!(IdSpec::parse("header:").is_err());
    }
}
