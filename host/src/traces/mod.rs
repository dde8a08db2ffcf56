//! OpenTelemetry traces, off unless an OTLP endpoint is configured (`[tracing]`,
//! `--otlp-endpoint`; docs/operations.md says what a trace holds).
//!
//! - [`Traces`]: a worker's tracer. Spans leave in batches, from a thread of the SDK's own,
//!   over OTLP/HTTP (protobuf); the W3C trace context of a record (`traceparent`,
//!   `tracestate`) is read from its headers and written into those of what it becomes.
//! - [`BatchTrace`] (`batch.rs`): the spans of one batch, begun when it is taken and ended
//!   when it is committed.

mod batch;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanExporter,
};

pub use self::batch::{BatchTrace, Ending, Fate, Stage};
use crate::record::wit::Header;

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Spans waiting for export; more are dropped (a slow or absent receiver never holds up
/// records).
const MAX_QUEUED_SPANS: usize = 65_536;
/// How often a failing export is logged, at most.
const EXPORT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why traces cannot start.
#[derive(Debug, thiserror::Error)]
#[error("cannot send traces to {endpoint}: {reason}")]
pub struct TracesError {
    endpoint: String,
    reason: String,
}

/// A worker's tracer (cheap to clone).
#[derive(Clone, Debug)]
pub struct Traces {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
}

impl Traces {
    /// Starts sending spans to `endpoint` (the receiver's `…/v1/traces`) as `service`, for
    /// the worker `worker` of `pipeline`, tracing `sample_ratio` of the batches. Runs its
    /// requests on the current tokio runtime.
    pub fn start(
        endpoint: &str,
        service: &str,
        sample_ratio: f64,
        (pipeline, worker): (&str, &str),
    ) -> Result<Self, TracesError> {
        let failed = |reason: String| TracesError {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| failed(format!("no async runtime ({e})")))?;
        let client = OnRuntime {
            client: Arc::new(
                opentelemetry_http::hyper::HyperClient::with_default_connector(
                    EXPORT_TIMEOUT,
                    None,
                ),
            ),
            runtime,
            endpoint: endpoint.to_owned(),
            last_failure_log: Mutex::new(None),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(endpoint)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let resource = vec![
            KeyValue::new("weir.pipeline", pipeline.to_owned()),
            KeyValue::new("service.instance.id", worker.to_owned()),
        ];
        Ok(Self::with_exporter(
            exporter,
            service,
            sample_ratio,
            resource,
        ))
    }

    /// A tracer whose spans go to `exporter`.
    fn with_exporter(
        exporter: impl SpanExporter + 'static,
        service: &str,
        sample_ratio: f64,
        resource: Vec<KeyValue>,
    ) -> Self {
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUED_SPANS)
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            // A record's producer decides for its own trace; the ratio, for batches.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(service.to_owned())
                    .with_attributes(resource)
                    .build(),
            )
            .build();
        let tracer = provider.tracer("weir");
        Self { tracer, provider }
    }

    /// Sends the spans still queued and stops (blocks: call it off the runtime's threads).
    pub fn shut_down(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("traces: the last spans were not all sent: {e}");
        }
    }
}

/// The W3C trace context in `headers`, when they carry a valid one.
fn producer_context(headers: &[Header]) -> Option<SpanContext> {
    if !(headers.iter()).any(|(name, _)| name.eq_ignore_ascii_case("traceparent")) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderReader(headers));
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// The trace id (32 hex digits) of the context in `headers`, to look the trace up with.
pub fn trace_id(headers: &[Header]) -> Option<String> {
    producer_context(headers).map(|span| span.trace_id().to_string())
}

/// The headers that carry `span` downstream (`traceparent`, and `tracestate` if any).
fn context_headers(span: &SpanContext) -> Vec<Header> {
    let mut headers = Vec::with_capacity(2);
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(&mut headers));
    headers
}

/// Replaces the trace context in `headers` by `context` (from [`context_headers`]).
fn replace_context(headers: &mut Vec<Header>, context: &[Header]) {
    let trace_header = |name: &str| {
        ["traceparent", "tracestate"]
            .map(|h| name.eq_ignore_ascii_case(h))
            .contains(&true)
    };
    headers.retain(|(name, _)| !trace_header(name));
    headers.extend_from_slice(context);
}

/// Record headers as the propagator reads them (values that are not UTF-8 are not there).
struct HeaderReader<'a>(&'a [Header]);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0.iter().rev())
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

struct HeaderWriter<'a>(&'a mut Vec<Header>);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes `tracestate` even when it is empty.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value.into_bytes()));
        }
    }
}

/// The exporter's HTTP client. The SDK exports from a thread of its own and hyper needs the
/// tokio runtime, so each request runs on the worker's runtime. Failures are logged, once a
/// minute at most.
#[derive(Debug)]
struct OnRuntime {
    client: Arc<opentelemetry_http::hyper::HyperClient>,
    runtime: tokio::runtime::Handle,
    endpoint: String,
    last_failure_log: Mutex<Option<Instant>>,
}

impl OnRuntime {
    fn log_failure(&self, what: &dyn std::fmt::Display) {
        let mut last = (self.last_failure_log.lock()).unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= EXPORT_FAILURE_LOG_EVERY) {
            *last = Some(Instant::now());
            let endpoint = &self.endpoint;
            tracing::warn!("traces: cannot send spans to {endpoint}: {what}");
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        let response = match sent.await {
            Ok(response) => response,
            Err(stopped) => Err(stopped.into()),
        };
        match &response {
            Err(e) => self.log_failure(e),
            Ok(r) if !r.status().is_success() => self.log_failure(&r.status()),
            Ok(_) => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producers_context_is_read_and_written_back_with_its_state() {
        let headers: Vec<Header> = vec![
            (
                "TraceParent".into(),
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
            ),
            ("tracestate".into(), b"vendor=x".to_vec()),
            ("other".into(), b"\xff".to_vec()),
        ];
        let span = producer_context(&headers).expect("a context");
        assert_eq!(
            span.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(span.span_id().to_string(), "b7ad6b7169203331");
        assert!(span.is_sampled() && span.is_remote());
        let written = context_headers(&span);
        let mut out = headers.clone();
        replace_context(&mut out, &written);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["other", "traceparent", "tracestate"]);
        assert_eq!(out[1].1, headers[0].1);
        assert_eq!(out[2].1, b"vendor=x");

        assert_eq!(
            trace_id(&out).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        let bad = [("traceparent".to_owned(), b"00-not-a-context-01".to_vec())];
        assert!(producer_context(&bad).is_none());
        assert!(producer_context(&headers[1..]).is_none());
    }
}
