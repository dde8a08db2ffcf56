//! The data types of the WIT contract's `types` interface (`wit/transform.wit`), written out
//! here so the record model depends on nothing else in the crate. The runtime's `bindgen!`
//! maps the interface onto this module (`with`), and wasmtime checks these types against
//! every plugin's own at load time, so a field that drifts from the WIT fails loudly.

use wasmtime::component::{ComponentType, Lift, Lower};

/// A header: a name and raw bytes (like a Kafka header).
pub type Header = (String, Vec<u8>);

/// Plugin configuration: `key=value` pairs given to the host (`--plugin-config`).
pub type Config = Vec<(String, String)>;

/// Where a record came from.
#[derive(ComponentType, Lift, Lower, Debug, Clone, Default, PartialEq, Eq)]
#[component(record)]
pub struct SourceMeta {
    /// Kafka topic, or the input file path (`-` for stdin).
    #[component(name = "stream")]
    pub stream: String,
    /// Kafka partition; 0 for files.
    pub partition: i32,
    /// Kafka offset, or the 1-based line number in the input file.
    pub offset: i64,
    /// 1 on the first try; 2, 3, ... on retries.
    pub attempt: u32,
}

/// One input record.
#[derive(ComponentType, Lift, Lower, Debug, Clone, Default, PartialEq, Eq)]
#[component(record)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// Headers in their original order; names may repeat.
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch, when the source knows it.
    #[component(name = "timestamp-ms")]
    pub timestamp_ms: Option<i64>,
    pub source: SourceMeta,
}

/// One output record; `destination: None` is the pipeline's default sink.
#[derive(ComponentType, Lift, Lower, Debug, Clone, PartialEq, Eq)]
#[component(record)]
pub struct Output {
    pub destination: Option<String>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<Header>,
}

/// Why a record could not be transformed, as the plugin sees it.
#[derive(ComponentType, Lift, Lower, Debug, Clone, PartialEq, Eq)]
#[component(variant)]
pub enum TransformError {
    /// Transient: the host retries with backoff.
    #[component(name = "retryable")]
    Retryable(String),
    /// Permanent: dead-lettered as `invalid`.
    #[component(name = "invalid")]
    Invalid(String),
}
