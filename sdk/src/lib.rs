//! Write a [Weir](https://example.invalid/weir) transform plugin in Rust as one ordinary
//! function from a record to outputs.
//!
//! ```
//! use weir_sdk::{Output, Record, SourceMeta, TransformError};
//!
//! /// Upper-cases every value; refuses values that are not UTF-8.
//! #[weir_sdk::transform]
//! fn shout(record: Record) -> Result<Output, TransformError> {
//!     let text = String::from_utf8(record.value)
//!         .map_err(|_| TransformError::Invalid("value: not UTF-8".into()))?;
//!     Ok(Output::new(text.to_uppercase()))
//! }
//!
//! fn main() {
//!     // The function stays an ordinary function: test it natively with `cargo test`.
//!     let record = |value: &[u8]| Record {
//!         key: None,
//!         value: value.to_vec(),
//!         headers: vec![],
//!         timestamp_ms: None,
//!         source: SourceMeta { stream: "test".into(), partition: 0, offset: 1, attempt: 1 },
//!     };
//!     assert_eq!(shout(record(b"hi")).unwrap().value, b"HI");
//!     assert!(matches!(shout(record(&[0xff])), Err(TransformError::Invalid(_))));
//! }
//! ```
//!
//! The attribute generates the `batch` world's exports: `init` (which stores the plugin
//! configuration, readable with [`config`]) and `transform-batch` (which calls your function
//! once per record, so one bad record never fails its neighbours). Build with
//! `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the component.
//!
//! Your function may return `Result<T, TransformError>` where `T` is [`Output`],
//! `Option<Output>` (`None` drops the record) or `Vec<Output>` (fan-out). Return
//! [`TransformError::Invalid`] for input that can never succeed (it goes to the dead-letter
//! queue at once) and [`TransformError::Retryable`] for transient trouble (the host retries
//! with backoff). A panic is caught by the host: the record is dead-lettered as `trap` with
//! the panic message.
//!
//! To check the configuration once at start, name a function:
//! `#[weir_sdk::transform(init = check)]` with `fn check(config: &weir_sdk::Config) -> Result<(), String>`.

use std::sync::OnceLock;

/// Bindings generated from the WIT contract (`weir:transform@0.1.0`, world `stateful`: the
/// `batch` world plus the `state` import, which a plugin's component imports only when it
/// calls [`state`]).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "stateful",
        pub_export_macro: true,
        export_macro_name: "__export_batch",
        default_bindings_module: "weir_sdk::bindings",
    });
}

pub use bindings::weir::transform::host::Level;
pub use bindings::weir::transform::types::{Output, Record, SourceMeta, TransformError};
pub use weir_sdk_macro::transform;

/// The plugin configuration (`--plugin-config key=value` on the host).
#[derive(Debug, Default, Clone)]
pub struct Config(Vec<(String, String)>);

impl Config {
    /// The value of `key`, if given (the last one wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every pair, in the order given.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

pub mod state;

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The configuration the host handed to `init` (empty before `init`).
pub fn config() -> &'static Config {
    CONFIG.get_or_init(Config::default)
}

/// Writes a log line through the host, tagged with this plugin's name and version.
pub fn log(level: Level, message: &str) {
    bindings::weir::transform::host::log(level, message);
}

impl Output {
    /// An output to the pipeline's default sink.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self {
            destination: None,
            key: None,
            value: value.into(),
            headers: Vec::new(),
        }
    }

    /// An output to a named destination (configured on the host).
    pub fn to(destination: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            destination: Some(destination.into()),
            ..Self::new(value)
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What a transform function may return on success.
pub trait IntoOutputs {
    fn into_outputs(self) -> Vec<Output>;
}

impl IntoOutputs for Output {
    fn into_outputs(self) -> Vec<Output> {
        vec![self]
    }
}

impl IntoOutputs for Option<Output> {
    fn into_outputs(self) -> Vec<Output> {
        self.into_iter().collect()
    }
}

impl IntoOutputs for Vec<Output> {
    fn into_outputs(self) -> Vec<Output> {
        self
    }
}

/// Used by the code `#[transform]` generates; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::exports::weir::transform::batch_transform::Guest;

    use super::*;

    /// A user function that checks the configuration.
    pub type Check = fn(&Config) -> Result<(), String>;

    pub fn init(pairs: Vec<(String, String)>, check: Option<Check>) -> Result<(), String> {
        let config = CONFIG.get_or_init(|| Config(pairs));
        match check {
            Some(check) => check(config),
            None => Ok(()),
        }
    }

    pub fn batch<T: IntoOutputs>(
        records: Vec<Record>,
        f: fn(Record) -> Result<T, TransformError>,
    ) -> Vec<Result<Vec<Output>, TransformError>> {
        records
            .into_iter()
            .map(|r| f(r).map(IntoOutputs::into_outputs))
            .collect()
    }
}
