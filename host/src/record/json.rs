//! JSON-lines encodings shared by the file source, the file sink and the file DLQ.
//!
//! A record is `{"key", "value", "headers", "timestamp"}`. Bytes that are valid UTF-8 are
//! written as text; other bytes as base64 with a `*_base64: true` flag beside them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// Bytes as text, or base64 when they are not UTF-8.
/// Bytes as text when they are UTF-8, else as base64 (the flag says which).
pub(crate) fn encode(bytes: &[u8]) -> (String, bool) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (BASE64.encode(bytes), true),
    }
}

fn decode(field: &str, text: String, base64: bool) -> Result<Vec<u8>, String> {
    if base64 {
        BASE64
            .decode(text.as_bytes())
            .map_err(|e| format!("`{field}` is flagged base64 but is not: {e}"))
    } else {
        Ok(text.into_bytes())
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One header of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderJson {
    pub name: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub base64: bool,
}

/// A record as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordJson {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub key_base64: bool,
    pub value: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub value_base64: bool,
    #[serde(default)]
    pub headers: Vec<HeaderJson>,
    #[serde(default)]
    pub timestamp: Option<i64>,
}

/// The plain parts of a record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecordParts {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl RecordJson {
    pub fn encode(
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(String, Vec<u8>)],
        timestamp: Option<i64>,
    ) -> Self {
        let (key, key_base64) = match key.map(encode) {
            Some((k, b)) => (Some(k), b),
            None => (None, false),
        };
        let (value, value_base64) = encode(value);
        let headers = headers
            .iter()
            .map(|(name, value)| {
                let (value, base64) = encode(value);
                HeaderJson {
                    name: name.clone(),
                    value,
                    base64,
                }
            })
            .collect();
        Self {
            key,
            key_base64,
            value,
            value_base64,
            headers,
            timestamp,
        }
    }

    pub fn decode(self) -> Result<RecordParts, String> {
        let key = match self.key {
            Some(k) => Some(decode("key", k, self.key_base64)?),
            None => None,
        };
        let value = decode("value", self.value, self.value_base64)?;
        let headers = self
            .headers
            .into_iter()
            .map(|h| {
                let value = decode("headers", h.value, h.base64)?;
                Ok((h.name, value))
            })
            .collect::<Result<_, String>>()?;
        Ok(RecordParts {
            key,
            value,
            headers,
            timestamp: self.timestamp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_bytes_round_trip_as_base64() {
        let headers = vec![("h".to_owned(), vec![0xff, 0x00])];
        let json = RecordJson::encode(Some(b"k"), &[0xc3, 0x28], &headers, Some(5));
        assert!(json.value_base64 && !json.key_base64 && json.headers[0].base64);
        let text = serde_json::to_string(&json).expect("serialize");
        let back: RecordJson = serde_json::from_str(&text).expect("parse");
        let parts = back.decode().expect("decode");
        assert_eq!(parts.value, vec![0xc3, 0x28]);
        assert_eq!(parts.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(parts.headers, headers);
    }

    #[test]
    fn text_stays_text() {
        let json = RecordJson::encode(None, br#"{"id":"1"}"#, &[], None);
        let text = serde_json::to_string(&json).expect("serialize");
        assert_eq!(
            text,
            r#"{"key":null,"value":"{\"id\":\"1\"}","headers":[],"timestamp":null}"#
        );
    }
}
