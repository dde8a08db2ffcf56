//! Record ids for deduplication: the configured idempotency key, else the source position.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::Record;

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
            Self::Pointer(pointer) => pointer_text(&record.value, pointer)?,
            Self::Header(name) => text(&record.headers.iter().rev().find(|(n, _)| n == name)?.1),
            Self::Key => text(record.key.as_deref()?),
        };
        (!id.is_empty()).then_some(id)
    }
}

/// The value at a JSON pointer as text (a string's content; other values as compact JSON),
/// `None` for null, a missing member or a value that is not JSON. Only the members on the
/// pointer's path are looked at: the rest of the document is checked but not built.
fn pointer_text(json: &[u8], pointer: &str) -> Option<String> {
    let mut at: &RawValue = serde_json::from_slice(json).ok()?;
    for token in pointer.split('/').skip(1) {
        let token = if token.contains('~') {
            Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
        } else {
            Cow::Borrowed(token)
        };
        let mut de = serde_json::Deserializer::from_str(at.get());
        at = Member(&token).deserialize(&mut de).ok()??;
    }
    let text = at.get();
    match text.as_bytes().first()? {
        b'"' => serde_json::from_str(text).ok(),
        b'n' => None,
        _ => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .ok()?
                .to_string(),
        ),
    }
}

/// Finds one member of an object (by name) or element of an array (by index) as raw JSON,
/// skipping over the others.
struct Member<'t>(&'t str);

impl<'de> DeserializeSeed<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(name) = map.next_key::<Name<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            // The last of repeated names wins, as when the whole document is parsed.
            if name.0 == self.0 {
                found = Some(value);
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // RFC 6901: a decimal index without leading zeros.
        let index = (self.0 == "0" || !self.0.starts_with(['0', '+']))
            .then(|| self.0.parse::<usize>().ok())
            .flatten();
        let mut found = None;
        let mut i = 0;
        while let Some(value) = seq.next_element::<&'de RawValue>()? {
            if Some(i) == index {
                found = Some(value);
            }
            i += 1;
        }
        Ok(found)
    }
}

/// An object member's name, borrowed from the document unless it has escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(name)))
            }

            fn visit_str<E>(self, name: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(name.to_owned())))
            }
        }
        de.deserialize_str(NameVisitor)
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
    use crate::record::SourceMeta;

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
        let r = record(
            r#"{"id":"a","n":7,"deep":{ "x" : true },"nul":null,"list":["a","b"],"esc":"x\"y","a/b":"slash","twice":"first","twice":"second"}"#,
        );
        let id = |spec: &str| record_id(Some(&IdSpec::parse(spec).expect("spec")), &r);
        assert_eq!(id("/id"), "a");
        assert_eq!(id("/n"), "7");
        assert_eq!(id("/deep/x"), "true");
        assert_eq!(id("/deep"), r#"{"x":true}"#);
        assert_eq!(id("/nul"), "in:0:9");
        assert_eq!(id("/list/1"), "b");
        assert_eq!(id("/list/01"), "in:0:9");
        assert_eq!(id("/list/9"), "in:0:9");
        assert_eq!(id("/esc"), "x\"y");
        assert_eq!(id("/a~1b"), "slash");
        assert_eq!(id("/twice"), "second");
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
