//! The pinned `enrich` transform (see `tests/vectors/enrich/README.md`), as plain Rust.
//!
//! Input: a JSON object with non-empty string `id` and `user_id` and an integer `ts`
//! (seconds since the Unix epoch, years 0001–9999). Output: the same object plus
//! `segment` = `"seg-"` + FNV-1a-32(user_id) mod 10, `cohort` = the ISO-8601 week of `ts`
//! in UTC as `YYYY-Www`, and `action_valid` = `action` is one of view, click, purchase,
//! add_to_cart. Anything else is refused with a reason that names the field.
//!
//! The object is read as a list of members whose values stay raw JSON text: only `id`,
//! `user_id`, `ts` and `action` are decoded, and every other member is copied to the output
//! as it came (no tree of values is built and written out again).

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Earliest and latest `ts` accepted: 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
pub const TS_MIN: i64 = -62_135_596_800;
pub const TS_MAX: i64 = 253_402_300_799;

const VALID_ACTIONS: [&str; 4] = ["view", "click", "purchase", "add_to_cart"];

/// The members `enrich` adds, replacing input members of the same name.
const ADDED: [&str; 3] = ["segment", "cohort", "action_valid"];

/// The fields of a valid event that the transforms read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    /// Seconds since the Unix epoch.
    pub ts: i64,
    /// `action`, when it is a string.
    pub action: Option<Cow<'a, str>>,
}

/// Reads and checks one event (the validation of `enrich`); `Err` is the reason the input
/// is invalid, naming the field.
pub fn event(input: &[u8]) -> Result<Event<'_>, String> {
    let members = members(input)?;
    checked(&members).map(|(event, _)| event)
}

/// An object's members, values as raw JSON.
fn members(input: &[u8]) -> Result<Vec<(Cow<'_, str>, &RawValue)>, String> {
    let value: &RawValue =
        serde_json::from_slice(input).map_err(|e| format!("malformed JSON: {e}"))?;
    if type_name(value) != "an object" {
        return Err(format!(
            "the value must be a JSON object, got {}",
            type_name(value)
        ));
    }
    let Members(members) =
        serde_json::from_str(value.get()).map_err(|e| format!("malformed JSON: {e}"))?;
    Ok(members)
}

/// The event in `members`, and whether its action is valid.
fn checked<'a>(members: &[(Cow<'a, str>, &'a RawValue)]) -> Result<(Event<'a>, bool), String> {
    let get = |name: &str| {
        // The last of repeated names counts, as when the object is parsed into a map.
        members
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    };
    let id = non_empty_string(get("id"), "id")?;
    let user_id = non_empty_string(get("user_id"), "user_id")?;
    let ts = timestamp(get("ts"))?;
    let action = get("action").and_then(string);
    let action_valid = action
        .as_ref()
        .is_some_and(|a| VALID_ACTIONS.contains(&a.as_ref()));
    Ok((
        Event {
            id,
            user_id,
            ts,
            action,
        },
        action_valid,
    ))
}

/// Enriches one JSON value; `Err` is the reason the input is invalid.
pub fn enrich(input: &[u8]) -> Result<Vec<u8>, String> {
    let members = members(input)?;
    let (Event { user_id, ts, .. }, action_valid) = checked(&members)?;

    let mut out = Vec::with_capacity(input.len() + 64);
    out.push(b'{');
    for ((name, value), keep) in members.iter().zip(kept(&members)) {
        if !keep || ADDED.contains(&name.as_ref()) {
            continue;
        }
        serde_json::to_writer(&mut out, name.as_ref()).map_err(|e| e.to_string())?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
        out.push(b',');
    }
    let segment = fnv1a32(user_id.as_bytes()) % 10;
    out.extend_from_slice(format!("\"segment\":\"seg-{segment}\",").as_bytes());
    out.extend_from_slice(format!("\"cohort\":\"{}\",", iso_week(ts)).as_bytes());
    out.extend_from_slice(format!("\"action_valid\":{action_valid}}}").as_bytes());
    Ok(out)
}

/// An object's members in order, names decoded, values as raw JSON.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(Name(name)) = map.next_key()? {
                    members.push((name, map.next_value()?));
                }
                Ok(Members(members))
            }
        }
        de.deserialize_map(MembersVisitor)
    }
}

/// A member name: borrowed from the input unless it had escapes.
struct Name<'a>(Cow<'a, str>);

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

/// Which members to keep: each name once, with its last value, as a map would hold them.
fn kept(members: &[(Cow<'_, str>, &RawValue)]) -> Vec<bool> {
    let mut keep = vec![true; members.len()];
    if members.len() <= 32 {
        for (i, (name, _)) in members.iter().enumerate() {
            keep[i] = !members[i + 1..].iter().any(|(later, _)| later == name);
        }
    } else {
        // Many members: sort rather than compare every pair (stable, so repeats stay in order).
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&a, &b| members[a].0.cmp(&members[b].0));
        for pair in order.windows(2) {
            if members[pair[0]].0 == members[pair[1]].0 {
                keep[pair[0]] = false;
            }
        }
    }
    keep
}

/// What kind of JSON value `value` is, for reasons.
fn type_name(value: &RawValue) -> &'static str {
    match value.get().as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

/// The text of a JSON string, borrowed when it has no escapes; `None` for other values.
fn string(value: &RawValue) -> Option<Cow<'_, str>> {
    let raw = value.get();
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

fn non_empty_string<'a>(value: Option<&'a RawValue>, field: &str) -> Result<Cow<'a, str>, String> {
    let value = value.ok_or_else(|| format!("`{field}` is missing"))?;
    match string(value) {
        Some(s) if s.is_empty() => Err(format!("`{field}` must not be empty")),
        Some(s) => Ok(s),
        None => Err(format!(
            "`{field}` must be a string, got {}",
            type_name(value)
        )),
    }
}

fn timestamp(value: Option<&RawValue>) -> Result<i64, String> {
    let value = value.ok_or("`ts` is missing")?;
    let ts = match type_name(value) {
        "a number" => serde_json::from_str::<serde_json::Number>(value.get())
            .map_err(|e| format!("`ts` is not a number JSON can hold: {e}"))?,
        other => {
            return Err(format!(
                "`ts` must be an integer number of seconds, got {other}"
            ));
        }
    };
    let seconds = match (ts.as_i64(), ts.as_f64()) {
        (Some(i), _) => i,
        // An integral float such as 1.0e9 is an integer number too (JSON does not tell them apart).
        (None, Some(f)) if f.fract() == 0.0 && f >= TS_MIN as f64 && f <= TS_MAX as f64 => f as i64,
        (None, Some(f)) if f.fract() == 0.0 => i64::MAX,
        _ => {
            return Err(format!(
                "`ts` must be an integer number of seconds, got {ts}"
            ));
        }
    };
    if !(TS_MIN..=TS_MAX).contains(&seconds) {
        return Err(format!("`ts` {ts} is out of range (years 0001 to 9999)"));
    }
    Ok(seconds)
}

/// FNV-1a, 32 bits.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The year of a day number (days since 1970-01-01).
fn year_of(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(month <= 2)
}

/// The UTC calendar day of a Unix timestamp, as `YYYY-MM-DD`.
pub fn utc_day(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let year = year_of(days);
    let mut month = 1;
    while month < 12 && days_from_civil(year, month + 1, 1) <= days {
        month += 1;
    }
    let day = days - days_from_civil(year, month, 1) + 1;
    format!("{year:04}-{month:02}-{day:02}")
}

/// ISO-8601 week-based year and week of a Unix timestamp, as `YYYY-Www`.
pub fn iso_week(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let weekday = (days + 3).rem_euclid(7); // Monday = 0; 1970-01-01 was a Thursday
    let thursday = days - weekday + 3; // the ISO year is the year of the week's Thursday
    let year = year_of(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    format!("{year:04}-W{week:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    fn ts(year: i64, month: i64, day: i64) -> i64 {
        days_from_civil(year, month, day) * 86_400
    }

    #[test]
    fn iso_week_edges() {
        assert_eq!(iso_week(0), "1970-W01");
        assert_eq!(iso_week(ts(2024, 1, 1)), "2024-W01");
        assert_eq!(iso_week(ts(2021, 1, 3)), "2020-W53"); // 2020 has 53 weeks
        assert_eq!(iso_week(ts(2020, 12, 31)), "2020-W53");
        assert_eq!(iso_week(ts(2019, 12, 30)), "2020-W01"); // late December in next year's week 1
        assert_eq!(iso_week(ts(2027, 1, 1)), "2026-W53");
        assert_eq!(iso_week(ts(1, 1, 1)), "0001-W01");
        assert_eq!(iso_week(TS_MAX), "9999-W52");
        assert_eq!(iso_week(-1), "1970-W01"); // 1969-12-31 is a Wednesday of 1970-W01
    }

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(-1), "1969-12-31");
        assert_eq!(utc_day(ts(2024, 2, 29) + 86_399), "2024-02-29");
        assert_eq!(utc_day(ts(2024, 3, 1)), "2024-03-01");
        assert_eq!(utc_day(ts(2026, 12, 31)), "2026-12-31");
        assert_eq!(utc_day(TS_MIN), "0001-01-01");
        assert_eq!(utc_day(TS_MAX), "9999-12-31");
    }

    #[test]
    fn events_are_read_with_enrichs_checks() {
        let e = event(br#"{"id":"e\u0031","user_id":"u","ts":5,"action":"view"}"#).unwrap();
        assert_eq!((e.id.as_ref(), e.user_id.as_ref(), e.ts), ("e1", "u", 5));
        assert_eq!(e.action.as_deref(), Some("view"));
        assert!(
            event(br#"{"id":"a","ts":1}"#)
                .unwrap_err()
                .contains("`user_id`")
        );
    }

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn reasons_name_the_field() {
        let reason = |input: &str| enrich(input.as_bytes()).unwrap_err();
        assert!(reason("{").contains("JSON"));
        assert!(reason("[1]").contains("object"));
        assert!(reason(r#"{"user_id":"u","ts":1}"#).contains("`id`"));
        assert!(reason(r#"{"id":"a","user_id":"","ts":1}"#).contains("`user_id`"));
        assert!(reason(r#"{"id":"a","user_id":"u","ts":1.5}"#).contains("`ts`"));
        assert!(reason(r#"{"id":"a","user_id":"u","ts":"1"}"#).contains("`ts`"));
        assert!(reason(r#"{"id":"a","user_id":"u","ts":1e300}"#).contains("out of range"));
    }

    #[test]
    fn enriches() {
        let out = enrich(
            br#"{"id":"e1","user_id":"a","ts":1704067200,"action":"click","metadata":{"k":[1]}}"#,
        )
        .expect("valid");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["segment"], "seg-0"); // fnv1a32("a") = 0xe40c292c = 3826002220
        assert_eq!(v["cohort"], "2024-W01");
        assert_eq!(v["action_valid"], true);
        assert_eq!(v["metadata"]["k"][0], 1);
    }

    /// Members pass through as a map parsed from the input holds them: repeated names (the
    /// last wins), escaped names and values, nested values, replaced members, many members.
    #[test]
    fn members_pass_through_as_a_map_holds_them() {
        let many: String = (0..40).map(|i| format!(r#""m{}":{i},"#, i % 25)).collect();
        let inputs = [
            r#"{"id":"a","user_id":"u","ts":1}"#.to_owned(),
            r#" { "id" : "a" , "user_id":"u\u00e9\n", "ts":1, "id":"b", "x":{"y":[1,2.50,"\n",null]}, "a\"b":1, "segment":"old", "ts":1700000000.0, "action":"vi\u0065w" } "#.to_owned(),
            format!(r#"{{{many}"id":"a","user_id":"ünï","ts":-1,"action":"click","cohort":[]}}"#),
        ];
        for input in &inputs {
            let bytes = enrich(input.as_bytes()).expect(input);
            let Members(members) = serde_json::from_slice(&bytes).expect("output is an object");
            let mut names: Vec<&str> = members.iter().map(|(n, _)| n.as_ref()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), members.len(), "repeated names: {input}");
            let out: Value = serde_json::from_slice(&bytes).expect("output is JSON");
            let mut expected: Map<String, Value> = serde_json::from_str(input).expect("input");
            let user_id = expected["user_id"].as_str().expect("user_id").to_owned();
            let ts = expected["ts"].as_f64().expect("ts") as i64;
            let action_valid = matches!(expected.get("action"), Some(Value::String(a)) if VALID_ACTIONS.contains(&a.as_str()));
            let segment = format!("seg-{}", fnv1a32(user_id.as_bytes()) % 10);
            expected.insert("segment".into(), segment.into());
            expected.insert("cohort".into(), iso_week(ts).into());
            expected.insert("action_valid".into(), action_valid.into());
            assert_eq!(out, Value::Object(expected), "{input}");
        }
    }
}
