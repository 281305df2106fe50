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
    pub(crate) fn for_call(span: &tracing::Span) -> Option<TraceContext> {
        match TraceContext::current() {
            Some(current) => Some(current.child()),
            None if !span.is_disabled() => Some(TraceContext::new_root()),
            None => None,
        }
    }
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
