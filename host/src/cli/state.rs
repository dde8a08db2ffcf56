//! `weir state dump|get`: a stateful plugin's keyed state, read-only, from the embedded
//! store. One JSON object per key: `{"partition":P,"key":K,"value":V}`, key and value as
//! UTF-8 text when they are, else (or with `--base64`) as base64 with `"key_base64":true` /
//! `"value_base64":true` beside them (as in dead letters).

use std::path::PathBuf;

use anyhow::bail;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::state::keyed::KeyedEntry;
use crate::state::read_keyed_state;

#[derive(Subcommand)]
pub(super) enum StateCommand {
    /// Print every key of a plugin's state.
    Dump(Scope),
    /// Print the given keys (those that are set).
    Get {
        #[command(flatten)]
        scope: Scope,
        /// The keys, as UTF-8 text.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Whose state, where.
#[derive(Args)]
pub(super) struct Scope {
    /// The plugin's name (`--plugin-name` of its run; by default its file name without `.wasm`).
    #[arg(long = "plugin-name")]
    plugin: String,
    /// The pipeline's name [default: the plugin's name].
    #[arg(long)]
    pipeline: Option<String>,
    /// The state directory of the run.
    #[arg(long, default_value = ".weir/state")]
    state: PathBuf,
    /// Only this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Keys and values always as base64.
    #[arg(long)]
    base64: bool,
}

impl StateCommand {
    pub async fn execute(self) -> anyhow::Result<()> {
        let (scope, keys) = match self {
            StateCommand::Dump(scope) => (scope, None),
            StateCommand::Get { scope, keys } => (scope, Some(keys)),
        };
        let pipeline = scope.pipeline.as_deref().unwrap_or(&scope.plugin);
        let entries = read_keyed_state(&scope.state, pipeline, &scope.plugin)?;
        let mut shown = 0usize;
        for entry in entries {
            if scope.partition.is_some_and(|p| p != entry.partition) {
                continue;
            }
            if keys
                .as_ref()
                .is_some_and(|keys| !keys.iter().any(|k| k.as_bytes() == entry.key))
            {
                continue;
            }
            println!("{}", line(&entry, scope.base64));
            shown += 1;
        }
        if keys.is_some() && shown == 0 {
            bail!("none of those keys is set");
        }
        Ok(())
    }
}

/// One entry as a JSON line, members in the order of the docs; bytes that are not UTF-8 (or
/// all, with `base64`) as base64 with a `*_base64: true` flag, as in dead letters.
pub(super) fn line(entry: &KeyedEntry, base64: bool) -> String {
    let mut line = format!(r#"{{"partition":{}"#, entry.partition);
    for (name, bytes) in [("key", &entry.key), ("value", &entry.value)] {
        let (text, is_base64) = match base64 {
            true => (BASE64.encode(bytes), true),
            false => crate::record::json::encode(bytes),
        };
        line.push_str(&format!(",\"{name}\":{}", Value::from(text)));
        if is_base64 {
            line.push_str(&format!(",\"{name}_base64\":true"));
        }
    }
    line.push('}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_bytes_become_base64() {
        let entry = KeyedEntry {
            partition: 2,
            key: b"count/u1".to_vec(),
            value: vec![0xff, 0x00],
        };
        assert_eq!(
            line(&entry, false),
            r#"{"partition":2,"key":"count/u1","value":"/wA=","value_base64":true}"#
        );
        assert_eq!(
            line(&entry, true),
            r#"{"partition":2,"key":"Y291bnQvdTE=","key_base64":true,"value":"/wA=","value_base64":true}"#
        );
    }
}
