//! W3C trace context carried in the call header, so a server's handler span continues the
//! caller's trace.
//!
//! A call made while a [`TraceContext`] is current (see [`TraceContext::scope`]) carries a
//! child of it on the wire (trace id kept, new span id); the handler on the server runs with
//! the received context as its current one, inside a `rpc.handle` span whose `trace_id`
//! and `parent_span_id` fields name the caller's. A call made outside any trace carries
//! nothing (one tag byte) unless the `rpc.call` span is enabled, in which case it starts a
//! new trace.

use serde::{Deserialize, Serialize};

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// A W3C trace context (`traceparent`): a 128-bit trace id, the 64-bit id of the span that
/// made the call, and the sampled flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The trace this call belongs to (never zero).
    pub trace_id: u128,
    /// The span that sent the call, the parent of the server's span (never zero).
    pub span_id: u64,
    /// Whether the caller records this trace (W3C `sampled` flag).
    pub sampled: bool,
}

/// Why a `traceparent` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {0:?}: expected 00-<32 hex>-<16 hex>-<2 hex>, ids not zero")]
pub struct TraceParseError(pub String);

fn nonzero_u64() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

impl TraceContext {
    /// A new trace (random trace and span ids), sampled.
    pub fn new_root() -> TraceContext {
        let trace_id = loop {
            let id: u128 = rand::random();
            if id != 0 {
                break id;
            }
        };
        TraceContext {
            trace_id,
            span_id: nonzero_u64(),
            sampled: true,
        }
    }

    /// A new span of the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: nonzero_u64(),
            ..*self
        }
    }

    /// The context of the task running now, if it runs inside [`TraceContext::scope`] (a
    /// handler serving a traced call does).
    pub fn current() -> Option<TraceContext> {
        CURRENT.try_with(|context| *context).ok()
    }

    /// Runs `future` with `self` as the current context: calls it makes carry this trace.
    pub async fn scope<F: std::future::Future>(self, future: F) -> F::Output {
        CURRENT.scope(self, future).await
    }

    /// The W3C `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// Parses a W3C `traceparent` header value (version 00).
    pub fn parse_traceparent(value: &str) -> Result<TraceContext, TraceParseError> {
        let refuse = || TraceParseError(value.chars().take(64).collect());
        let parts: Vec<&str> = value.trim().split('-').collect();
        let [version, trace, span, flags] = parts[..] else {
            return Err(refuse());
        };
        fn hex(s: &str, len: usize) -> Option<&str> {
            (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
        }
        if hex(version, 2) != Some("00") {
            return Err(refuse());
        }
        let trace_id = hex(trace, 32)
            .and_then(|s| u128::from_str_radix(s, 16).ok())
            .filter(|id| *id != 0)
            .ok_or_else(refuse)?;
        let span_id = hex(span, 16)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .filter(|id| *id != 0)
            .ok_or_else(refuse)?;
        let flags = hex(flags, 2)
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .ok_or_else(refuse)?;
        Ok(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// What an outgoing call carries: a child of the current context, or a new trace when
    /// none is current but the `rpc.call` span is recorded, or nothing.
    #[cfg(not(feature = "opentelemetry"))]
    pub(crate) fn for_call(span: &tracing::Span) -> Option<TraceContext> {
        TraceContext::without_otel(span)
    }

    /// What an outgoing call carries: the OpenTelemetry context of the `rpc.call` span when
    /// an OpenTelemetry layer records it (so the exported client span is the server span's
    /// parent), else as without the feature.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn for_call(span: &tracing::Span) -> Option<TraceContext> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if span.is_disabled() {
            return TraceContext::without_otel(span);
        }
        if let Some(current) = TraceContext::current() {
            // A context set by `scope` (or received by this handler) that the OpenTelemetry
            // span around the call does not continue becomes the call span's parent, so the
            // trace the caller asked for is the one exported. Must precede `span.context()`,
            // which starts the span.
            let around = tracing::Span::current().context();
            let around = around.span();
            let around = around.span_context();
            if !around.is_valid()
                || u128::from_be_bytes(around.trace_id().to_bytes()) != current.trace_id
            {
                let _ = span.set_parent(current.otel_remote());
            }
        }
        let otel = span.context();
        let otel = otel.span();
        let otel = otel.span_context();
        if !otel.is_valid() {
            // No OpenTelemetry layer records this span.
            return TraceContext::without_otel(span);
        }
        Some(TraceContext::from_otel(otel))
    }

    fn without_otel(span: &tracing::Span) -> Option<TraceContext> {
        match TraceContext::current() {
            Some(current) => Some(current.child()),
            None if !span.is_disabled() => Some(TraceContext::new_root()),
            None => None,
        }
    }

    /// This context as OpenTelemetry's, its span remote (received from another process).
    #[cfg(feature = "opentelemetry")]
    fn otel_remote(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let remote = SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            flags,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(remote)
    }

    #[cfg(feature = "opentelemetry")]
    fn from_otel(otel: &opentelemetry::trace::SpanContext) -> TraceContext {
        TraceContext {
            trace_id: u128::from_be_bytes(otel.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(otel.span_id().to_bytes()),
            sampled: otel.is_sampled(),
        }
    }
}

/// The `rpc.call` span of an outgoing call.
pub(crate) fn call_span(service: &str, method: &str) -> tracing::Span {
    #[cfg(not(feature = "opentelemetry"))]
    let span = tracing::debug_span!(
        "rpc.call",
        service,
        method,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty
    );
    // OpenTelemetry's span kind and name (`service/method`, as gRPC's are named).
    #[cfg(feature = "opentelemetry")]
    let span = tracing::debug_span!(
        "rpc.call",
        service,
        method,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        otel.kind = "client",
        otel.name = %format_args!("{service}/{method}"),
    );
    span
}

/// The `rpc.handle` span a handler runs in: for a traced call a child of the caller's span
/// (its OpenTelemetry parent too, with the feature); for an untraced one none, or with the
/// feature a new root when the span is recorded.
pub(crate) fn handle_span(
    service: &str,
    method: &str,
    parent: Option<&TraceContext>,
) -> Option<tracing::Span> {
    #[cfg(not(feature = "opentelemetry"))]
    let span = parent.map(|parent| {
        tracing::info_span!(
            "rpc.handle",
            service,
            method,
            trace_id = %format_args!("{:032x}", parent.trace_id),
            parent_span_id = %format_args!("{:016x}", parent.span_id),
        )
    });
    #[cfg(feature = "opentelemetry")]
    let span = {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::info_span!(
            "rpc.handle",
            service,
            method,
            trace_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
            otel.kind = "server",
            otel.name = %format_args!("{service}/{method}"),
        );
        match parent {
            Some(parent) => {
                span.record("trace_id", format_args!("{:032x}", parent.trace_id));
                span.record("parent_span_id", format_args!("{:016x}", parent.span_id));
                // Fails only when no OpenTelemetry layer records the span: nothing to link.
                let _ = span.set_parent(parent.otel_remote());
                Some(span)
            }
            None => (!span.is_disabled()).then_some(span),
        }
    };
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let context = TraceContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            sampled: true,
        };
        let text = context.traceparent();
        assert_eq!(
            text,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(TraceContext::parse_traceparent(&text), Ok(context));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse_traceparent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }
}
