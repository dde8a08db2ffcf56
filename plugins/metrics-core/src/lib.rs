//! The pinned `metrics` transform (see `tests/vectors/metrics/README.md`), as plain Rust over
//! any keyed [`State`]: derived metrics of the `enrich` events, per user.
//!
//! Input validation is `enrich`'s (`id`, `user_id` non-empty strings, `ts` integer seconds).
//! State: `count/<user>` (valid events so far, decimal text), `stage/<user>` (the highest
//! funnel stage reached: `view` < `add_to_cart` < `purchase`), `seen/<user>/<YYYY-MM-DD>` =
//! `1` once the user was active that UTC day. Outputs, in this order: `active_user` on a
//! user's first event of a UTC day, then `funnel` when the event's `action` is a stage
//! higher than the user's.

use enrich_core::{event, utc_day};

/// Keyed state as `metrics` uses it: text keys and values.
pub trait State {
    fn get(&mut self, key: &str) -> Option<String>;
    fn set(&mut self, key: &str, value: &str);
}

/// Plain memory (the native side of the benchmark, and tests).
impl State for std::collections::HashMap<String, String> {
    fn get(&mut self, key: &str) -> Option<String> {
        std::collections::HashMap::get(self, key).cloned()
    }

    fn set(&mut self, key: &str, value: &str) {
        self.insert(key.to_owned(), value.to_owned());
    }
}

/// The funnel stages, lowest first.
const STAGES: [&str; 3] = ["view", "add_to_cart", "purchase"];

fn rank(stage: &str) -> Option<usize> {
    STAGES.iter().position(|s| *s == stage)
}

/// The outputs of one event, updating `state`; `Err` is the reason the input is invalid (no
/// state is read or written then).
pub fn metrics(input: &[u8], state: &mut impl State) -> Result<Vec<Vec<u8>>, String> {
    let event = event(input)?;
    let (id, user) = (json(&event.id), json(&event.user_id));
    let mut outputs = Vec::new();

    let count_key = format!("count/{}", event.user_id);
    let count: u64 = state
        .get(&count_key)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    state.set(&count_key, &(count + 1).to_string());

    let day = utc_day(event.ts);
    let seen_key = format!("seen/{}/{day}", event.user_id);
    if state.get(&seen_key).is_none() {
        state.set(&seen_key, "1");
        outputs.push(
            format!(r#"{{"type":"active_user","user_id":{user},"day":"{day}","id":{id}}}"#)
                .into_bytes(),
        );
    }

    if let Some(stage) = event.action.as_deref().filter(|a| rank(a).is_some()) {
        let stage_key = format!("stage/{}", event.user_id);
        let previous = state.get(&stage_key);
        let higher = match previous.as_deref().and_then(rank) {
            Some(was) => rank(stage) > Some(was),
            None => true,
        };
        if higher {
            state.set(&stage_key, stage);
            let from = previous.as_deref().map_or_else(|| "null".to_owned(), json);
            outputs.push(
                format!(
                    r#"{{"type":"funnel","user_id":{user},"stage":"{stage}","from":{from},"id":{id}}}"#
                )
                .into_bytes(),
            );
        }
    }
    Ok(outputs)
}

/// A JSON string.
fn json(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(state: &mut HashMap<String, String>, input: &str) -> Vec<String> {
        metrics(input.as_bytes(), state)
            .expect("valid")
            .into_iter()
            .map(|o| String::from_utf8(o).expect("UTF-8"))
            .collect()
    }

    #[test]
    fn a_users_first_event_of_a_day_and_each_higher_stage_emit() {
        let mut state = HashMap::new();
        let out = run(
            &mut state,
            r#"{"id":"a","user_id":"u","ts":0,"action":"view"}"#,
        );
        assert_eq!(
            out,
            [
                r#"{"type":"active_user","user_id":"u","day":"1970-01-01","id":"a"}"#,
                r#"{"type":"funnel","user_id":"u","stage":"view","from":null,"id":"a"}"#
            ]
        );
        assert!(
            run(
                &mut state,
                r#"{"id":"b","user_id":"u","ts":60,"action":"view"}"#
            )
            .is_empty()
        );
        let out = run(
            &mut state,
            r#"{"id":"c","user_id":"u","ts":86400,"action":"purchase"}"#,
        );
        assert_eq!(out.len(), 2);
        assert!(out[1].contains(r#""stage":"purchase","from":"view""#));
        assert!(
            run(
                &mut state,
                r#"{"id":"d","user_id":"u","ts":86401,"action":"add_to_cart"}"#
            )
            .is_empty()
        );
        assert_eq!(state["count/u"], "4");
        assert_eq!(state["stage/u"], "purchase");
        assert_eq!(state["seen/u/1970-01-02"], "1");
    }

    #[test]
    fn invalid_events_touch_nothing() {
        let mut state = HashMap::new();
        let reason = metrics(br#"{"id":"a","user_id":"","ts":0}"#, &mut state).unwrap_err();
        assert!(reason.contains("`user_id`"), "{reason}");
        assert!(state.is_empty());
    }
}
