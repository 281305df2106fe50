//! OpenTelemetry export of the RPC spans (cargo feature `opentelemetry`).
//!
//! With the feature, a call carries the OpenTelemetry context of its `rpc.call` span in its
//! W3C `traceparent`, and the server's `rpc.handle` span takes the received context as its
//! OpenTelemetry parent, so a collector (Jaeger, Tempo, an OTel collector) shows caller and
//! callee as one trace. This module builds what an embedder needs to export them: an
//! OTLP/HTTP (protobuf) span exporter behind a batch processor, and the
//! `tracing-opentelemetry` layer to add to the `tracing` subscriber.
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! # fn demo() -> Result<(), grapevine::telemetry::TelemetryError> {
//! let telemetry = grapevine::telemetry::OtlpConfig::new("http://127.0.0.1:4318", "orders")
//!     .instance_id("node-1")
//!     .build()?;
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::EnvFilter::new("info,grapevine::rpc=debug"))
//!     .with(telemetry.layer())
//!     .with(tracing_subscriber::fmt::layer())
//!     .init();
//! // ... run the node; before exiting, send what is still queued:
//! telemetry.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! The `rpc.call` span is at `debug` level and `rpc.handle` at `info`: a filter that keeps
//! `grapevine::rpc` at `debug` exports both sides. Spans wait in a bounded queue (2,048 by
//! default; the SDK's `OTEL_BSP_*` variables tune it) and are sent by a thread of the SDK
//! every 5 s; a full queue drops spans rather than grow, and each export gives up after
//! [`OtlpConfig::timeout`].

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// Why the OTLP exporter could not be built or shut down.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not an `http://` URL.
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The OpenTelemetry SDK refused the exporter's configuration.
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    /// Flushing or stopping the exporter failed (the collector did not answer in time).
    #[error("OTLP exporter shutdown: {0}")]
    Shutdown(String),
}

/// Where and as what an OTLP/HTTP exporter sends spans; [`OtlpConfig::build`] starts it.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    endpoint: String,
    service_name: String,
    instance_id: Option<String>,
    timeout: Duration,
}

impl OtlpConfig {
    /// Spans of `service_name` (the resource's `service.name`) sent to `endpoint`, the
    /// collector's OTLP/HTTP receiver: a base URL such as `http://127.0.0.1:4318` gets the
    /// traces path `/v1/traces` appended (as `OTEL_EXPORTER_OTLP_ENDPOINT` does); a URL
    /// with a path is used as it is.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> OtlpConfig {
        OtlpConfig {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            instance_id: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// The resource's `service.instance.id`, telling apart the processes of one service
    /// (the agent uses its node name).
    pub fn instance_id(mut self, id: impl Into<String>) -> OtlpConfig {
        self.instance_id = Some(id.into());
        self
    }

    /// How long one export request may take before it is abandoned (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> OtlpConfig {
        self.timeout = timeout;
        self
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> Result<String, TelemetryError> {
        traces_url(&self.endpoint)
    }

    /// Builds the exporter and its batch processor (which runs on a thread of its own, so
    /// this works with or without a tokio runtime).
    pub fn build(&self) -> Result<Telemetry, TelemetryError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(self.traces_url()?)
            .with_timeout(self.timeout)
            .build()
            .map_err(|error| TelemetryError::Build(error.to_string()))?;
        let mut resource = Resource::builder().with_service_name(self.service_name.clone());
        if let Some(id) = &self.instance_id {
            resource = resource.with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                id.clone(),
            ));
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Telemetry { provider })
    }
}

/// A running OTLP exporter: hands out the `tracing` layer that feeds it. Dropping it sends
/// the spans still queued and stops the exporter, as [`Telemetry::shutdown`] does (which
/// also reports a failure); both block up to the export timeout.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // The layer's tracer keeps the provider alive, so its own drop would never flush.
        // A second shutdown (after `shutdown`) only reports that it already ran.
        let _ = self.provider.shutdown();
    }
}

impl Telemetry {
    /// An exporter feeding `provider` (for embedders that build their own, e.g. with
    /// another exporter or sampler).
    pub fn from_provider(provider: SdkTracerProvider) -> Telemetry {
        Telemetry { provider }
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans of this exporter.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("grapevine"))
    }

    /// The SDK's tracer provider (to register as `opentelemetry::global`'s, or to flush).
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Sends the spans still queued and stops the exporter. It blocks (up to the export
    /// timeout): from async code call it in `spawn_blocking`.
    pub fn shutdown(self) -> Result<(), TelemetryError> {
        let result = self.provider.shutdown();
        result.map_err(|error| TelemetryError::Shutdown(error.to_string()))
    }
}

/// `endpoint` with the traces path appended when it has no path of its own.
fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let refuse = |reason: &str| TelemetryError::Endpoint {
        endpoint: endpoint.chars().take(200).collect(),
        reason: reason.to_string(),
    };
    // The exporter's HTTP client is built without TLS; a collector is usually a local
    // sidecar or agent.
    let rest = if let Some(rest) = endpoint.strip_prefix("http://") {
        rest
    } else if endpoint.starts_with("https://") {
        return Err(refuse(
            "https is not supported by this build; export to a local collector over http://",
        ));
    } else {
        return Err(refuse("expected http://HOST:PORT[/PATH]"));
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(refuse("no host"));
    }
    if path.is_empty() || path == "/" {
        Ok(format!("http://{authority}/v1/traces"))
    } else {
        Ok(endpoint.to_string())
    }
}
