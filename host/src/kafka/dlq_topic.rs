//! A DLQ topic from the command line: `weir dlq list` counts its dead letters by class, and
//! `weir dlq replay` re-publishes them (their original key, value and headers, without the
//! `weir.error.*` ones, with `weir.replay.count` raised by one) to a topic the workers
//! consume, so the pipeline processes them again. A replayed record's id gets the suffix
//! `#replay<n>` (see `pipeline::record_id`), which bypasses the original's done mark on
//! purpose and still deduplicates a replay run twice.

use std::collections::BTreeMap;

use super::{KafkaProducer, KafkaSink, TopicRecord};
use crate::config::KafkaConfig;
use crate::record::Output;
use crate::record::headers;
use crate::sink::{Lane, Sink};

/// What a dead letter read from the topic carries besides the original record.
impl TopicRecord {
    /// A `weir.error.<name>` header, as text.
    pub fn error(&self, name: &str) -> Option<String> {
        self.header(&headers::error(name))
    }

    pub fn replay_count(&self) -> u32 {
        self.header(headers::REPLAY_COUNT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// `weir dlq list` for a topic: counts by class and the first `show` letters of each.
pub fn render_list(topic: &str, letters: &[TopicRecord], show: usize) -> String {
    let mut by_class: BTreeMap<String, Vec<&TopicRecord>> = BTreeMap::new();
    for letter in letters {
        let class = letter.error("class").unwrap_or_else(|| "?".into());
        by_class.entry(class).or_default().push(letter);
    }
    let mut out = format!("{} dead letters in topic {topic}\n", letters.len());
    for (class, entries) in &by_class {
        out.push_str(&format!("  {class}: {}\n", entries.len()));
        for l in entries.iter().take(show) {
            let get = |k: &str| l.error(k).unwrap_or_else(|| "?".into());
            let message: String = get("message").chars().take(200).collect();
            let value: String = String::from_utf8_lossy(&l.value).chars().take(80).collect();
            let trace = crate::traces::trace_id(&l.headers)
                .map(|id| format!(" trace={id}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "    {}:{}:{} id={} attempts={} replays={}{trace} message: {message}\n      value: {value}\n",
                get("source"),
                get("partition"),
                get("offset"),
                get("record_id"),
                get("attempts"),
                l.replay_count(),
            ));
        }
    }
    out
}

/// What a topic replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub published: u64,
    /// At the replay cap: not published.
    pub refused: u64,
    /// Of another class than asked for.
    pub skipped: u64,
}

/// Re-publishes the letters of `class` (all when `None`) to `to`, except those replayed
/// `max_replays` times already.
pub async fn replay(
    kafka: &KafkaConfig,
    letters: Vec<TopicRecord>,
    to: &str,
    class: Option<&str>,
    max_replays: u32,
) -> anyhow::Result<Replayed> {
    let producer = KafkaProducer::new(kafka)?;
    let mut sink = KafkaSink::new(&producer, to, BTreeMap::new(), usize::MAX, None);
    let mut done = Replayed::default();
    let mut outputs = Vec::new();
    for letter in letters {
        if class.is_some_and(|c| letter.error("class").as_deref() != Some(c)) {
            done.skipped += 1;
            continue;
        }
        let count = letter.replay_count();
        if count >= max_replays {
            done.refused += 1;
            continue;
        }
        let mut headers: Vec<(String, Vec<u8>)> = letter
            .headers
            .into_iter()
            .filter(|(n, _)| !n.starts_with(headers::ERROR_PREFIX) && n != headers::REPLAY_COUNT)
            .collect();
        headers.push((
            headers::REPLAY_COUNT.to_owned(),
            (count + 1).to_string().into_bytes(),
        ));
        outputs.push(Output {
            destination: None,
            key: letter.key,
            value: letter.value,
            headers,
        });
        done.published += 1;
    }
    sink.send(outputs, Lane::default()).await?;
    sink.flush().await?;
    Ok(done)
}
