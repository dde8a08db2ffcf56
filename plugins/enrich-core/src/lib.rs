//! The pinned `enrich` transform (see `tests/vectors/enrich/README.md`), as plain Rust.
//!
//! Input: a JSON object with non-empty string `id` and `user_id` and an integer `ts`
//! (seconds since the Unix epoch, years 0001–9999). Output: the same object plus
//! `segment` = `"seg-"` + FNV-1a-32(user_id) mod 10, `cohort` = the ISO-8601 week of `ts`
//! in UTC as `YYYY-Www`, and `action_valid` = `action` is one of view, click, purchase,
//! add_to_cart. Anything else is refused with a reason that names the field.

use serde_json::{Map, Value};

/// Earliest and latest `ts` accepted: 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
pub const TS_MIN: i64 = -62_135_596_800;
pub const TS_MAX: i64 = 253_402_300_799;

const VALID_ACTIONS: [&str; 4] = ["view", "click", "purchase", "add_to_cart"];

/// Enriches one JSON value; `Err` is the reason the input is invalid.
pub fn enrich(input: &[u8]) -> Result<Vec<u8>, String> {
    let value: Value = serde_json::from_slice(input).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err(format!(
            "the value must be a JSON object, got {}",
            type_name(&value)
        ));
    };
    non_empty_string(&object, "id")?;
    let user_id = non_empty_string(&object, "user_id")?.to_owned();
    let ts = timestamp(&object)?;
    let action_valid = matches!(object.get("action"), Some(Value::String(a)) if VALID_ACTIONS.contains(&a.as_str()));
    object.insert(
        "segment".into(),
        Value::String(format!("seg-{}", fnv1a32(user_id.as_bytes()) % 10)),
    );
    object.insert("cohort".into(), Value::String(iso_week(ts)));
    object.insert("action_valid".into(), Value::Bool(action_valid));
    serde_json::to_vec(&object).map_err(|e| format!("cannot encode the output: {e}"))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn non_empty_string<'a>(object: &'a Map<String, Value>, field: &str) -> Result<&'a str, String> {
    match object.get(field) {
        None => Err(format!("`{field}` is missing")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("`{field}` must not be empty")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "`{field}` must be a string, got {}",
            type_name(other)
        )),
    }
}

fn timestamp(object: &Map<String, Value>) -> Result<i64, String> {
    let ts = match object.get("ts") {
        None => return Err("`ts` is missing".into()),
        Some(Value::Number(n)) => n,
        Some(other) => {
            return Err(format!(
                "`ts` must be an integer number of seconds, got {}",
                type_name(other)
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
}
