//! The `opentelemetry` feature: RPC spans exported to OpenTelemetry link caller and callee
//! with the ids that travelled in the call's traceparent, and the agent exports them over
//! OTLP/HTTP (decoded here by the `opentelemetry-proto` crate).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use grapevine::rpc::{Resolve, RpcClient, TraceContext};
use grapevine::telemetry::{OtlpConfig, Telemetry, TelemetryError};
use grapevine::RpcService;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use prost014::Message;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

mod common;

use common::{cluster, instances_visible, WAIT};

/// Keeps every span exported (the SDK's own in-memory exporter needs its `testing` feature,
/// which would be compiled into every test build).
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Collected {
    fn spans(&self) -> Vec<SpanData> {
        self.0.lock().unwrap().clone()
    }
}

/// The spans every test of this binary exports, through one global subscriber.
fn exported() -> &'static Collected {
    static SETUP: OnceLock<(Collected, Telemetry)> = OnceLock::new();
    &SETUP
        .get_or_init(|| {
            let exporter = Collected::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let telemetry = Telemetry::from_provider(provider);
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::new(
                    "grapevine::rpc=debug,otel=debug",
                ))
                .with(telemetry.layer());
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
            (exporter, telemetry)
        })
        .0
}

/// Waits (bounded) until the exporter holds a span matching `pick`: a server span may end
/// just after its reply reached the caller.
fn span(what: &str, pick: impl Fn(&SpanData) -> bool) -> SpanData {
    let deadline = Instant::now() + WAIT;
    loop {
        let spans = exported().spans();
        if let Some(found) = spans.iter().find(|s| pick(s)) {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {what} span among {:?}",
            spans
                .iter()
                .map(|s| (&s.name, s.span_kind.clone()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn trace_id(context: &TraceContext) -> TraceId {
    TraceId::from_bytes(context.trace_id.to_be_bytes())
}

fn span_id(context: &TraceContext) -> SpanId {
    SpanId::from_bytes(context.span_id.to_be_bytes())
}

/// A service whose handler answers with the traceparent it was called with.
fn whoami() -> RpcService {
    let traceparent =
        |(): ()| async move { Ok(TraceContext::current().map(|context| context.traceparent())) };
    RpcService::new("otel")
        .method("linked", traceparent)
        .method("rootless", traceparent)
        .method("untraced", traceparent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_spans_link_caller_and_callee_with_the_ids_on_the_wire() {
    exported();
    let nodes = cluster(2).await;
    nodes[1].serve(whoami()).await.unwrap();
    instances_visible(&nodes[0], "otel", 1).await;
    let client = nodes[0].client("otel");

    // (1) Inside a caller's span: client span child of it, server span child of the client's.
    let request = tracing::info_span!("request");
    let travelled = client
        .call::<(), Option<String>>("linked", &())
        .instrument(request)
        .await
        .unwrap()
        .expect("the call carried no traceparent");
    let travelled = TraceContext::parse_traceparent(&travelled).unwrap();
    let caller = span("request", |s| s.name == "request");
    let call = span("client", |s| {
        s.name == "otel/linked" && s.span_kind == SpanKind::Client
    });
    let handle = span("server", |s| {
        s.name == "otel/linked" && s.span_kind == SpanKind::Server
    });
    let trace = caller.span_context.trace_id();
    assert_eq!(call.span_context.trace_id(), trace);
    assert_eq!(handle.span_context.trace_id(), trace);
    assert_eq!(
        trace_id(&travelled),
        trace,
        "the traceparent names another trace"
    );
    assert_eq!(call.parent_span_id, caller.span_context.span_id());
    assert_eq!(span_id(&travelled), call.span_context.span_id());
    assert_eq!(handle.parent_span_id, call.span_context.span_id());
    assert!(
        handle.parent_span_is_remote,
        "the server's parent came from the wire"
    );
    assert!(travelled.sampled && handle.span_context.is_sampled());

    // (2) A caller with no span: its `rpc.call` span starts the trace, the server's continues it.
    let travelled = client
        .call::<(), Option<String>>("rootless", &())
        .await
        .unwrap()
        .expect("the call carried no traceparent");
    let travelled = TraceContext::parse_traceparent(&travelled).unwrap();
    let call = span("client", |s| {
        s.name == "otel/rootless" && s.span_kind == SpanKind::Client
    });
    let handle = span("server", |s| {
        s.name == "otel/rootless" && s.span_kind == SpanKind::Server
    });
    assert_eq!(
        call.parent_span_id,
        SpanId::INVALID,
        "the client span is a root"
    );
    assert_eq!(trace_id(&travelled), call.span_context.trace_id());
    assert_eq!(handle.span_context.trace_id(), call.span_context.trace_id());
    assert_eq!(handle.parent_span_id, call.span_context.span_id());

    // (3) A caller that records nothing sends no traceparent: the server's span is a valid root.
    let untraced = client
        .call::<(), Option<String>>("untraced", &())
        .with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await
        .unwrap();
    assert_eq!(untraced, None, "an untraced call carried a traceparent");
    let handle = span("server", |s| {
        s.name == "otel/untraced" && s.span_kind == SpanKind::Server
    });
    assert!(handle.span_context.is_valid());
    assert_eq!(handle.parent_span_id, SpanId::INVALID);

    // (4) A context the caller set with `TraceContext::scope` is the exported trace's.
    let root = TraceContext::new_root();
    root.scope(client.call::<(), Option<String>>("linked", &()))
        .await
        .unwrap();
    let call = span("scoped client", |s| {
        s.span_kind == SpanKind::Client && s.span_context.trace_id() == trace_id(&root)
    });
    assert_eq!(call.parent_span_id, span_id(&root));
    let handle = span("scoped server", |s| {
        s.span_kind == SpanKind::Server && s.span_context.trace_id() == trace_id(&root)
    });
    assert_eq!(handle.parent_span_id, call.span_context.span_id());
    for node in nodes {
        node.leave().await.unwrap();
    }
}

/// One OTLP/HTTP export request, as the receiver got it.
struct Export {
    path: String,
    content_type: String,
    body: ExportTraceServiceRequest,
}

/// A minimal OTLP/HTTP receiver on 127.0.0.1: answers 200 to every request, hands over each
/// decoded body. Its thread ends with the test process.
fn otlp_receiver() -> (SocketAddr, mpsc::Receiver<Export>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Requests on one keep-alive connection, one after another.
                while let Some(export) = read_export(&mut stream) {
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                    if tx.send(export).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn read_export(stream: &mut std::net::TcpStream) -> Option<Export> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    let path = head.split_whitespace().nth(1)?.to_string();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let length: usize = header("content-length")?.parse().ok()?;
    if length > 4 * 1024 * 1024 {
        return None;
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some(Export {
        path,
        content_type: header("content-type").unwrap_or_default(),
        body: ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf"),
    })
}

/// A free port for the agent (UDP and TCP).
fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

struct Nowhere;
impl Resolve for Nowhere {
    fn resolve(&self, _: &str) -> Vec<grapevine::rpc::Endpoint> {
        Vec::new()
    }
}

/// Kills and reaps the agent however the test ends.
struct Agent(std::process::Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_exports_its_handler_spans_over_otlp_http() {
    exported();
    let (collector, exports) = otlp_receiver();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("otel-agent-{}.log", std::process::id()));
    // The endpoint from the agent's configuration file (tests/cli.rs tries the flag).
    let config = log.with_extension("toml");
    std::fs::write(&config, format!("otlp_endpoint = \"http://{collector}\"\n")).unwrap();
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_grapevine"))
            .args(["agent", "--name", "otel-agent", "--profile", "local"])
            .args(["--bind", &addr.to_string()])
            .arg("--config")
            .arg(&config)
            // `rpc.handle` spans are at info, the agent's default (CI sets RUST_LOG=warn).
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the agent"),
    );
    let client = RpcClient::new(
        grapevine::net::TokioTransport,
        grapevine::node::rpc_preface(),
        Arc::new(Nowhere),
        0,
    );
    // A traced ping to the agent's built-in service, once it answers.
    let root = TraceContext::new_root();
    let deadline = Instant::now() + WAIT;
    loop {
        let ping = root.scope(client.call_addr::<(), grapevine::node::rpc::Pong>(
            addr,
            grapevine::rpc::BUILTIN_SERVICE,
            "ping",
            &(),
            Duration::from_secs(2),
        ));
        if ping.await.is_ok() {
            break;
        }
        assert!(
            agent.0.try_wait().unwrap().is_none(),
            "agent exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the agent never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM: the agent leaves, and sends the spans still queued before it exits.
    let term = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit_by = Instant::now() + WAIT;
    while agent.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < exit_by,
            "the agent did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut spans = Vec::new();
    while let Ok(export) = exports.recv_timeout(Duration::from_millis(500)) {
        assert_eq!(export.path, "/v1/traces");
        assert_eq!(export.content_type, "application/x-protobuf");
        for resource in export.body.resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            let attribute = |key: &str| {
                attributes.iter().find(|a| a.key == key).and_then(|a| {
                    match a.value.as_ref()?.value.as_ref()? {
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            s,
                        ) => Some(s.clone()),
                        _ => None,
                    }
                })
            };
            assert_eq!(attribute("service.name").as_deref(), Some("grapevine"));
            assert_eq!(
                attribute("service.instance.id").as_deref(),
                Some("otel-agent")
            );
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let handle = spans
        .iter()
        .find(|s| s.name == "grapevine/ping" && s.trace_id == root.trace_id.to_be_bytes())
        .unwrap_or_else(|| {
            panic!(
                "no grapevine/ping span of the trace among {:?}; log:\n{}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>(),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as Kind;
    assert_eq!(handle.kind, Kind::Server as i32);
    // Its parent is this process's client span, whose ids the call carried.
    let call = span("client ping", |s| {
        s.span_kind == SpanKind::Client && s.span_context.trace_id() == trace_id(&root)
    });
    assert_eq!(call.parent_span_id, span_id(&root));
    assert_eq!(
        handle.parent_span_id,
        call.span_context.span_id().to_bytes()
    );
}

#[test]
fn the_traces_path_is_appended_to_a_base_url_only() {
    let url = |endpoint: &str| OtlpConfig::new(endpoint, "test").traces_url();
    assert_eq!(
        url("http://127.0.0.1:4318").unwrap(),
        "http://127.0.0.1:4318/v1/traces"
    );
    assert_eq!(
        url("http://collector:4318/").unwrap(),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(
        url("http://collector:4318/custom/traces").unwrap(),
        "http://collector:4318/custom/traces"
    );
    for bad in [
        "",
        "collector:4318",
        "https://collector:4318",
        "http://",
        "http:// x/",
    ] {
        assert!(
            matches!(url(bad), Err(TelemetryError::Endpoint { .. })),
            "{bad:?}"
        );
        // A bad endpoint stops `build` too, before any exporter starts.
        assert!(OtlpConfig::new(bad, "test").build().is_err(), "{bad:?}");
    }
}
