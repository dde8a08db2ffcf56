//! Secrets in the configuration. A Kafka option's value or the Redis URL may say where a
//! secret is instead of holding it: `${env:NAME}` (an environment variable) or
//! `${file:PATH}` (a file's content, without its final newline), anywhere in the value, so
//! that no password sits in a config file, a command line or a process listing. They are
//! resolved once, when the worker starts. Secrets are never printed: `--check` shows values
//! as written with any secret-looking option hidden (a reference stays visible: it is no
//! secret), and every Redis URL in a message is shown without its password.

use std::fmt;

/// A reference that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError {
    /// The setting, e.g. `kafka.options.sasl.password`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for SecretError {}

/// `value` with every `${env:NAME}` and `${file:PATH}` replaced by what it names.
pub fn resolve(field: &str, value: &str) -> Result<String, SecretError> {
    resolve_with(field, value, str::to_owned)
}

/// As [`resolve`] for a URL: what a reference inside it names is percent-encoded, so that a
/// password with `/`, `@` or `:` stays in the URL's user part (a reference that is the whole
/// URL is taken as it is).
pub fn resolve_in_url(field: &str, url: &str) -> Result<String, SecretError> {
    if is_reference(url) {
        return resolve(field, url);
    }
    resolve_with(field, url, |secret| {
        secret
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    })
}

fn resolve_with(
    field: &str,
    value: &str,
    encode: impl Fn(&str) -> String,
) -> Result<String, SecretError> {
    let error = |reason: String| SecretError {
        field: field.to_owned(),
        reason,
    };
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(error(format!(
                "`${{{after}` is not closed: write ${{env:NAME}} or ${{file:PATH}}"
            )));
        };
        let reference = &after[..end];
        let resolved = match reference.split_once(':') {
            Some(("env", name)) => std::env::var(name)
                .map_err(|_| error(format!("the environment variable `{name}` is not set")))?,
            Some(("file", path)) => std::fs::read_to_string(path)
                .map(|text| text.strip_suffix('\n').unwrap_or(&text).to_owned())
                .map_err(|e| error(format!("cannot read the secret file `{path}`: {e}")))?,
            _ => {
                return Err(error(format!(
                    "`${{{reference}}}` is not ${{env:NAME}} or ${{file:PATH}}"
                )));
            }
        };
        out.push_str(&encode(&resolved));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a librdkafka property holds a secret (a password, a private key, a JAAS or
/// OAUTHBEARER configuration).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "oauthbearer.config"]
        .iter()
        .any(|word| key.contains(word))
        || key.ends_with(".key")
        || key.ends_with(".key.pem")
}

/// How `value` of option `key` may be shown: as written when it is not a secret or names
/// where its secret is, hidden otherwise.
pub fn shown(key: &str, value: &str) -> String {
    if !is_secret_key(key) || is_reference(value) {
        value.to_owned()
    } else {
        "<hidden>".to_owned()
    }
}

/// Whether `value` is a reference alone (`${env:…}` or `${file:…}`), holding no secret.
fn is_reference(value: &str) -> bool {
    let inner = value.strip_prefix("${").and_then(|v| v.strip_suffix('}'));
    inner.is_some_and(|r| !r.contains('}') && (r.starts_with("env:") || r.starts_with("file:")))
}

/// `url` without the password of its user part (`rediss://weir:***@host:6380/`). A password
/// that is a reference stays visible.
pub fn redact_url(url: &str) -> String {
    let urls = url_list(url);
    if urls.len() > 1 {
        return urls
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@`: a password may hold `/`, `?` or `#` (a Redis URL's path is a number).
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((_, password)) if is_reference(password) => userinfo.to_owned(),
        Some((user, _)) => format!("{user}:***"),
        // A lone part is the password (`redis://:pw@` or `redis://pw@`).
        None if is_reference(userinfo) => userinfo.to_owned(),
        None => "***".to_owned(),
    };
    format!("{scheme}://{shown}{}", &rest[at..])
}

/// The URLs of a comma-separated list (a Redis Cluster's seed nodes). It splits only at a
/// comma before `redis://` or `rediss://`, since a password may hold a comma.
pub fn url_list(urls: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = urls;
    while let Some(i) = [",redis://", ",rediss://"]
        .iter()
        .filter_map(|sep| rest.find(sep))
        .min()
    {
        out.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    out.push(rest);
    out.into_iter()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_resolved_from_the_environment_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").expect("write");
        let name = "WEIR_SECRETS_TEST_VALUE";
        #[allow(unsafe_code)]
        // SAFETY: set once, read below; no other test reads or writes this variable.
        unsafe {
            std::env::set_var(name, "from-env")
        };
        let value = format!("a ${{env:{name}}} b ${{file:{}}} c", file.display());
        assert_eq!(resolve("f", &value), Ok("a from-env b from-file c".into()));
        assert_eq!(resolve("f", "plain"), Ok("plain".into()));
    }

    #[test]
    fn a_secret_put_into_a_url_is_percent_encoded() {
        let name = "WEIR_SECRETS_TEST_URL_PASSWORD";
        #[allow(unsafe_code)]
        // SAFETY: set once, read below; no other test reads or writes this variable.
        unsafe {
            std::env::set_var(name, "a/b@c:d é")
        };
        let url = format!("rediss://weir:${{env:{name}}}@h:6380/0");
        assert_eq!(
            resolve_in_url("state.redis_url", &url),
            Ok("rediss://weir:a%2Fb%40c%3Ad%20%C3%A9@h:6380/0".into())
        );
    }

    #[test]
    fn a_reference_that_cannot_be_resolved_names_the_setting_and_why() {
        let missing = resolve("kafka.options.sasl.password", "${env:WEIR_SURELY_UNSET_42}");
        assert_eq!(
            missing.map_err(|e| e.to_string()),
            Err("kafka.options.sasl.password: the environment variable \
                 `WEIR_SURELY_UNSET_42` is not set"
                .into())
        );
        let unknown = resolve("f", "${vault:x}").map_err(|e| e.reason);
        assert!(unknown.is_err_and(|r| r.contains("is not ${env:NAME} or ${file:PATH}")));
        let open = resolve("f", "${env:X").map_err(|e| e.reason);
        assert!(open.is_err_and(|r| r.contains("is not closed")));
        let file = resolve("f", "${file:/surely/not/here}").map_err(|e| e.reason);
        assert!(file.is_err_and(|r| r.contains("cannot read the secret file")));
    }

    #[test]
    fn secrets_are_hidden_but_references_shown() {
        assert_eq!(shown("sasl.password", "hunter2"), "<hidden>");
        assert_eq!(shown("sasl.password", "${env:PW}"), "${env:PW}");
        assert_eq!(shown("ssl.key.pem", "-----BEGIN"), "<hidden>");
        assert_eq!(shown("sasl.jaas.config", "x"), "<hidden>");
        assert_eq!(shown("sasl.username", "weir"), "weir");
        assert_eq!(shown("security.protocol", "SASL_SSL"), "SASL_SSL");
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("rediss://weir:hunter2@redis:6380/0"),
            "rediss://weir:***@redis:6380/0"
        );
        assert_eq!(redact_url("redis://:hunter2@h/"), "redis://:***@h/");
        assert_eq!(redact_url("redis://hunter2@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:6379/"), "redis://h:6379/");
        assert_eq!(redact_url("redis://u:a/b?c#d@h/0"), "redis://u:***@h/0");
        // A cluster's seeds, each hidden; a comma in a password is no separator.
        assert_eq!(
            redact_url("redis://u:p,q@a:1,rediss://:x@b:2"),
            "redis://u:***@a:1,rediss://:***@b:2"
        );
        assert_eq!(
            redact_url("redis://weir:${env:PW}@h/"),
            "redis://weir:${env:PW}@h/"
        );
    }
}
