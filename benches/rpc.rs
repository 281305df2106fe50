//! RPC benchmark: grapevine against a raw TCP echo (the floor), tarpc in its two fastest
//! arrangements and tonic (unary gRPC), in one run.
//!
//! Every system echoes a 64-byte payload over 127.0.0.1 TCP. Each server runs in a child
//! process of its own (this binary re-executed with `--serve SYSTEM`); the client side runs
//! in the parent on a fresh runtime per system. Both sides use a tokio multi-thread runtime
//! with 2 worker threads. Systems:
//!
//! * floor: raw tokio TCP, u32 length prefix, no RPC layer;
//! * tarpc 0.37 inline: each channel's requests answered on the channel's own task, one after
//!   another (`execute(..).for_each(|response| response)`);
//! * tarpc 0.37 bounded: up to 64 requests of a channel polled concurrently on its task
//!   (`buffer_unordered(64)`);
//! * tonic 0.13: unary gRPC over HTTP/2, prost messages, `TCP_NODELAY`, adaptive windows;
//! * grapevine: `Node::call_node` (direct) and `node.client("echo").call` (catalog).
//!
//! For each it measures sequential latency (p50, p99, p99.9), throughput with 1 connection
//! and 64 calls in flight and with 8 connections × 32 calls, and CPU time per call of both
//! processes (client and server, from `/proc/<pid>/task/*/schedstat`). Rounds run every
//! system in turn; ratios are taken within a round against the best tarpc row, and the
//! worst round decides each target.
//!
//! Run with `cargo bench --bench rpc`. Knobs (environment variables):
//!
//! * `BENCH_ROUNDS`: rounds (default 3);
//! * `BENCH_SECS`: seconds each throughput load is measured (default 5);
//! * `BENCH_WARM_SECS`: seconds of load before measuring starts (default 1, at most a
//!   fifth of `BENCH_SECS`);
//! * `BENCH_CALLS`: sequential calls measured (default 20000);
//! * `BENCH_WARMUP`: sequential calls before measuring (default 2000);
//! * `BENCH_SYSTEMS`: which of `floor,tarpc-inline,tarpc-bounded,tonic,grapevine` to run
//!   (default all).
//!
//! Every loop is bounded in time; a server child exits when its stdin closes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use grapevine::rpc::{Endpoint, Resolve, RpcClient};
use grapevine::{Node, Profile, RpcService, ServiceClient};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const PAYLOAD: usize = 64;
/// Floor frames: u32 big-endian length, then the payload.
const FRAME: usize = 4 + PAYLOAD;
/// Longest a sequential-latency phase may take before it is abandoned.
const LATENCY_CAP: Duration = Duration::from_secs(120);
/// Timeout of one grapevine call issued by the benchmark.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
struct Settings {
    secs: f64,
    warm_secs: f64,
    calls: usize,
    warmup: usize,
}

impl Settings {
    fn from_env() -> Settings {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            match std::env::var(name) {
                Ok(value) => value.trim().parse().unwrap_or_else(|_| {
                    eprintln!("ignoring {name}={value:?}: not a number");
                    default
                }),
                Err(_) => default,
            }
        }
        let secs: f64 = var("BENCH_SECS", 5.0_f64).clamp(0.05, 600.0);
        let warm_secs: f64 = var("BENCH_WARM_SECS", 1.0_f64).clamp(0.0, secs / 5.0);
        Settings {
            secs,
            warm_secs,
            calls: var("BENCH_CALLS", 20_000usize).clamp(1, 10_000_000),
            warmup: var("BENCH_WARMUP", 2_000usize).min(10_000_000),
        }
    }

    fn measure(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }

    fn warm(&self) -> Duration {
        Duration::from_secs_f64(self.warm_secs)
    }

    /// Longest a throughput phase may take, warm-up and stragglers included.
    fn load_cap(&self) -> Duration {
        self.warm() + self.measure() + Duration::from_secs(15)
    }
}

/// A 64-byte payload whose first 8 bytes carry `seq`.
fn payload(seq: u64) -> ByteBuf {
    let mut bytes = vec![0xA5u8; PAYLOAD];
    bytes[..8].copy_from_slice(&seq.to_be_bytes());
    ByteBuf::from(bytes)
}

// ---------------------------------------------------------------------------------------
// Measurement helpers
// ---------------------------------------------------------------------------------------

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    /// CPU time of the whole process (client and server) per call, in microseconds.
    cpu_us: Option<f64>,
}

/// A throughput measurement.
#[derive(Clone, Copy, Debug)]
struct Rate {
    per_sec: f64,
    /// CPU time of the whole process (client and server) per call, in microseconds.
    cpu_us: Option<f64>,
}

/// Process id of the server child of the system being measured (0: none).
static SERVER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// CPU time used so far by every thread of this process (the client side) and of the
/// server child, in nanoseconds (Linux only; the machine may be shared, so CPU per call is
/// steadier than wall-clock rates).
fn cpu_nanos() -> Option<u64> {
    let server = SERVER_PID.load(Ordering::Relaxed);
    let mut total = process_cpu_nanos("self")?;
    if server != 0 {
        total += process_cpu_nanos(&server.to_string())?;
    }
    Some(total)
}

/// CPU time of every thread of `/proc/<pid>`, in nanoseconds.
fn process_cpu_nanos(pid: &str) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn cpu_per_call(before: Option<u64>, after: Option<u64>, calls: u64) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if calls > 0 && after >= before => {
            Some((after - before) as f64 / 1e3 / calls as f64)
        }
        _ => None,
    }
}

impl Latency {
    fn from_nanos(mut samples: Vec<u64>, cpu_us: Option<f64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1] as f64 / 1e3
        };
        Some(Latency {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            cpu_us,
        })
    }
}

/// One way to make a call, cloned into every task that keeps calls in flight.
trait Caller: Clone + Send + Sync + 'static {
    /// One echo call; checks the reply is the request.
    fn call(&self, request: &ByteBuf) -> impl Future<Output = Result<(), String>> + Send;
}

fn check_echo(request: &ByteBuf, reply: &[u8]) -> Result<(), String> {
    if reply == request.as_slice() {
        Ok(())
    } else {
        Err(format!("echo mismatch: {} bytes back", reply.len()))
    }
}

/// Sequential calls: `warmup` unmeasured, then `calls` measured one by one.
async fn sequential<C: Caller>(caller: &C, settings: Settings) -> Result<Latency, String> {
    let run = async {
        let request = payload(7);
        for _ in 0..settings.warmup {
            caller.call(&request).await?;
        }
        let mut samples = Vec::with_capacity(settings.calls);
        let cpu_before = cpu_nanos();
        for _ in 0..settings.calls {
            let started = Instant::now();
            caller.call(&request).await?;
            samples.push(started.elapsed().as_nanos() as u64);
        }
        let cpu = cpu_per_call(cpu_before, cpu_nanos(), settings.calls as u64);
        Latency::from_nanos(samples, cpu).ok_or_else(|| "no samples".to_string())
    };
    tokio::time::timeout(LATENCY_CAP, run)
        .await
        .map_err(|_| format!("sequential phase exceeded {LATENCY_CAP:?}"))?
}

/// Counts completed calls while the load runs; the rate is sampled over the measured
/// window only (after the warm-up).
async fn sample_rate(
    counter: &AtomicU64,
    settings: Settings,
    workers: &mut JoinSet<Result<(), String>>,
) -> Result<Rate, String> {
    tokio::time::sleep(settings.warm()).await;
    let (start_count, start, cpu_start) =
        (counter.load(Ordering::Relaxed), Instant::now(), cpu_nanos());
    tokio::time::sleep(settings.measure()).await;
    let (end_count, end, cpu_end) = (counter.load(Ordering::Relaxed), Instant::now(), cpu_nanos());
    // Every worker stops by itself at its deadline; wait for them, bounded.
    let finish = async {
        while let Some(joined) = workers.join_next().await {
            joined.map_err(|e| format!("worker failed: {e}"))??;
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(15), finish)
        .await
        .map_err(|_| "workers did not stop".to_string())??;
    let calls = end_count - start_count;
    Ok(Rate {
        per_sec: calls as f64 / (end - start).as_secs_f64(),
        cpu_us: cpu_per_call(cpu_start, cpu_end, calls),
    })
}

/// `depth` tasks per caller, each making calls back to back until the deadline.
async fn throughput<C: Caller>(
    callers: &[C],
    depth: usize,
    settings: Settings,
) -> Result<Rate, String> {
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + settings.warm() + settings.measure();
    let mut workers = JoinSet::new();
    for (c, caller) in callers.iter().enumerate() {
        for d in 0..depth {
            let caller = caller.clone();
            let counter = counter.clone();
            let request = payload((c * depth + d) as u64);
            workers.spawn(async move {
                while Instant::now() < deadline {
                    caller.call(&request).await?;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            });
        }
    }
    let run = sample_rate(&counter, settings, &mut workers);
    let result = tokio::time::timeout(settings.load_cap(), run)
        .await
        .map_err(|_| "throughput phase exceeded its time cap".to_string())?;
    workers.abort_all();
    result
}

// ---------------------------------------------------------------------------------------
// Floor: raw tokio TCP echo, u32 big-endian length + payload
// ---------------------------------------------------------------------------------------

async fn floor_server() -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            connections.spawn(floor_echo(stream));
        }
    });
    Ok((addr, task))
}

/// Echoes every complete frame back, batching the replies of what one read brought in.
async fn floor_echo(mut stream: TcpStream) {
    let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut output: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        match stream.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut at = 0;
        while input.len() - at >= 4 {
            let len = u32::from_be_bytes(input[at..at + 4].try_into().unwrap()) as usize;
            if len > 1 << 20 {
                return;
            }
            if input.len() - at < 4 + len {
                break;
            }
            output.extend_from_slice(&input[at..at + 4 + len]);
            at += 4 + len;
        }
        input.drain(..at);
        if input.capacity() - input.len() < 4096 {
            input.reserve(64 * 1024);
        }
        if !output.is_empty() {
            if stream.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
    }
}

fn floor_frame(seq: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&(PAYLOAD as u32).to_be_bytes());
    out.extend_from_slice(payload(seq).as_slice());
}

async fn floor_sequential(addr: SocketAddr, settings: Settings) -> Result<Latency, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let run = async {
        let mut request = Vec::with_capacity(FRAME);
        floor_frame(7, &mut request);
        let mut reply = [0u8; FRAME];
        let mut samples = Vec::with_capacity(settings.calls);
        let mut cpu_before = cpu_nanos();
        for i in 0..settings.warmup + settings.calls {
            if i == settings.warmup {
                cpu_before = cpu_nanos();
            }
            let started = Instant::now();
            stream.write_all(&request).await.map_err(io)?;
            stream.read_exact(&mut reply).await.map_err(io)?;
            let elapsed = started.elapsed();
            if reply[..] != request[..] {
                return Err("floor echo mismatch".to_string());
            }
            if i >= settings.warmup {
                samples.push(elapsed.as_nanos() as u64);
            }
        }
        let cpu = cpu_per_call(cpu_before, cpu_nanos(), settings.calls as u64);
        Latency::from_nanos(samples, cpu).ok_or_else(|| "no samples".to_string())
    };
    tokio::time::timeout(LATENCY_CAP, run)
        .await
        .map_err(|_| format!("sequential phase exceeded {LATENCY_CAP:?}"))?
}

/// Pipelined load: per connection, a writer keeps up to `depth` frames outstanding and a
/// reader matches the replies, in order, to what was sent.
async fn floor_throughput(
    addr: SocketAddr,
    connections: usize,
    depth: usize,
    settings: Settings,
) -> Result<Rate, String> {
    let io = |e: std::io::Error| e.to_string();
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + settings.warm() + settings.measure();
    let mut workers: JoinSet<Result<(), String>> = JoinSet::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let (mut reader, mut writer) = stream.into_split();
        let window = Arc::new(Semaphore::new(depth));
        let writer_window = window.clone();
        workers.spawn(async move {
            let mut seq = 0u64;
            let mut batch = Vec::with_capacity(depth * FRAME);
            let deadline = tokio::time::Instant::from_std(deadline);
            while Instant::now() < deadline.into_std() {
                let Ok(Ok(permit)) =
                    tokio::time::timeout_at(deadline, writer_window.acquire()).await
                else {
                    break;
                };
                permit.forget();
                floor_frame(seq, &mut batch);
                seq += 1;
                while let Ok(permit) = writer_window.try_acquire() {
                    permit.forget();
                    floor_frame(seq, &mut batch);
                    seq += 1;
                }
                writer.write_all(&batch).await.map_err(io)?;
                batch.clear();
            }
            // The server echoes what is outstanding, then closes: the reader ends there.
            writer.shutdown().await.map_err(io)
        });
        let counter = counter.clone();
        workers.spawn(async move {
            let mut expected = 0u64;
            let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
            loop {
                if reader.read_buf(&mut input).await.map_err(io)? == 0 {
                    return Ok(());
                }
                let mut at = 0;
                let mut got = 0;
                while input.len() - at >= FRAME {
                    let len = u32::from_be_bytes(input[at..at + 4].try_into().unwrap());
                    let seq = u64::from_be_bytes(input[at + 4..at + 12].try_into().unwrap());
                    if len as usize != PAYLOAD || seq != expected {
                        return Err(format!("floor reply {seq} out of order ({expected})"));
                    }
                    expected += 1;
                    got += 1;
                    at += FRAME;
                }
                input.drain(..at);
                if input.capacity() - input.len() < 4096 {
                    input.reserve(64 * 1024);
                }
                counter.fetch_add(got, Ordering::Relaxed);
                window.add_permits(got as usize);
            }
        });
    }
    let run = sample_rate(&counter, settings, &mut workers);
    let result = tokio::time::timeout(settings.load_cap(), run)
        .await
        .map_err(|_| "throughput phase exceeded its time cap".to_string())?;
    workers.abort_all();
    result
}

// ---------------------------------------------------------------------------------------
// tarpc
// ---------------------------------------------------------------------------------------

/// How the tarpc server executes the requests of one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TarpcMode {
    /// Each response future is awaited on the channel's own task, one after another (no
    /// spawn, no cross-thread wake-up: tarpc's fastest arrangement for a cheap handler).
    Inline,
    /// Up to `TARPC_CONCURRENCY` response futures polled concurrently on the channel's task
    /// (`buffer_unordered`).
    Bounded,
}

/// Concurrent requests per channel in [`TarpcMode::Bounded`]: the deepest load's in-flight
/// count per connection.
const TARPC_CONCURRENCY: usize = 64;

mod tarpc_echo {
    use super::*;
    use tarpc::tokio_serde::formats::Bincode;
    use tarpc::tokio_util::codec::LengthDelimitedCodec;
    use tarpc::{client, context, server::Channel};

    #[tarpc::service]
    pub trait Echo {
        async fn echo(data: ByteBuf) -> ByteBuf;
    }

    #[derive(Clone)]
    struct EchoServer;

    impl Echo for EchoServer {
        async fn echo(self, _: context::Context, data: ByteBuf) -> ByteBuf {
            data
        }
    }

    /// Serves `Echo` over TCP with the Bincode codec, one channel (task) per connection,
    /// its requests executed as `mode` says.
    pub async fn serve(listener: TcpListener, mode: TarpcMode) {
        let mut channels = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            // Same socket option as the floor and grapevine (tarpc's own TCP helpers
            // leave Nagle on); otherwise what `serde_transport::tcp::listen` builds.
            let _ = stream.set_nodelay(true);
            let framed = LengthDelimitedCodec::builder().new_framed(stream);
            let transport = tarpc::serde_transport::new(framed, Bincode::default());
            let channel = tarpc::server::BaseChannel::with_defaults(transport);
            let responses = channel.execute(EchoServer.serve());
            match mode {
                TarpcMode::Inline => {
                    channels.spawn(responses.for_each(|response| response));
                }
                TarpcMode::Bounded => {
                    channels.spawn(
                        responses
                            .buffer_unordered(TARPC_CONCURRENCY)
                            .for_each(|()| async {}),
                    );
                }
            }
        }
    }

    #[derive(Clone)]
    pub struct TarpcCaller {
        client: EchoClient,
    }

    pub async fn connect(addr: SocketAddr) -> std::io::Result<TarpcCaller> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let framed = LengthDelimitedCodec::builder().new_framed(stream);
        let transport = tarpc::serde_transport::new(framed, Bincode::default());
        let mut config = client::Config::default();
        // Room for every call of the heaviest load at once.
        config.max_in_flight_requests = 1024;
        config.pending_request_buffer = 1024;
        let client = EchoClient::new(config, transport).spawn();
        Ok(TarpcCaller { client })
    }

    impl Caller for TarpcCaller {
        async fn call(&self, request: &ByteBuf) -> Result<(), String> {
            let mut ctx = context::current();
            // Far beyond any phase: no deadline expires during the run.
            ctx.deadline = Instant::now() + Duration::from_secs(120);
            let reply = self
                .client
                .echo(ctx, request.clone())
                .await
                .map_err(|e| format!("tarpc: {e}"))?;
            check_echo(request, &reply)
        }
    }
}

// ---------------------------------------------------------------------------------------
// tonic: unary gRPC over HTTP/2, prost-encoded messages, no code generation step
// ---------------------------------------------------------------------------------------

mod tonic_echo {
    use super::*;
    use tonic::codec::ProstCodec;
    use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
    use tonic::server::{NamedService, UnaryService};
    use tonic::transport::{Channel, Endpoint, Server};

    /// `message Echo { bytes payload = 1; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EchoMessage {
        #[prost(bytes = "vec", tag = "1")]
        pub payload: Vec<u8>,
    }

    const PATH: &str = "/bench.Echo/Echo";

    /// What tonic's generated server code does for one unary method, written out.
    #[derive(Clone)]
    struct EchoService;

    struct EchoUnary;

    impl UnaryService<EchoMessage> for EchoUnary {
        type Response = EchoMessage;
        type Future = BoxFuture<tonic::Response<EchoMessage>, tonic::Status>;
        fn call(&mut self, request: tonic::Request<EchoMessage>) -> Self::Future {
            Box::pin(async move { Ok(tonic::Response::new(request.into_inner())) })
        }
    }

    impl<B> Service<http::Request<B>> for EchoService
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            if request.uri().path() == PATH {
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                    Ok(grpc.unary(EchoUnary, request).await)
                })
            } else {
                Box::pin(
                    async move { Ok(tonic::Status::unimplemented("no such method").into_http()) },
                )
            }
        }
    }

    impl NamedService for EchoService {
        const NAME: &'static str = "bench.Echo";
    }

    /// Serves the echo method; TCP_NODELAY and HTTP/2 adaptive flow-control windows (the
    /// fastest settings tonic documents for small messages).
    pub async fn serve(listener: TcpListener) {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let _ = Server::builder()
            .tcp_nodelay(true)
            .http2_adaptive_window(Some(true))
            .add_service(EchoService)
            .serve_with_incoming(incoming)
            .await;
    }

    /// One HTTP/2 connection (a `Channel`), its calls multiplexed on it.
    #[derive(Clone)]
    pub struct TonicCaller {
        grpc: tonic::client::Grpc<Channel>,
    }

    pub async fn connect(addr: SocketAddr) -> Result<TonicCaller, String> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect()
            .await
            .map_err(|e| format!("tonic connect: {e}"))?;
        Ok(TonicCaller {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    impl Caller for TonicCaller {
        async fn call(&self, request: &ByteBuf) -> Result<(), String> {
            let mut grpc = self.grpc.clone();
            grpc.ready().await.map_err(|e| format!("tonic: {e}"))?;
            let message = EchoMessage {
                payload: request.to_vec(),
            };
            let reply: tonic::Response<EchoMessage> = grpc
                .unary(
                    tonic::Request::new(message),
                    http::uri::PathAndQuery::from_static(PATH),
                    ProstCodec::default(),
                )
                .await
                .map_err(|e| format!("tonic: {e}"))?;
            check_echo(request, &reply.into_inner().payload)
        }
    }
}

// ---------------------------------------------------------------------------------------
// grapevine
// ---------------------------------------------------------------------------------------

/// A resolver that knows no service: the extra clients only call addresses directly.
struct Nowhere;

impl Resolve for Nowhere {
    fn resolve(&self, _: &str) -> Vec<Endpoint> {
        Vec::new()
    }
}

/// `Node::call_node`: a direct call to an address through the node's connection pool.
#[derive(Clone)]
struct NodeCaller {
    node: Arc<Node>,
    server: SocketAddr,
}

impl Caller for NodeCaller {
    async fn call(&self, request: &ByteBuf) -> Result<(), String> {
        let reply: ByteBuf = self
            .node
            .call_node(self.server, "echo", "echo", request)
            .await
            .map_err(|e| format!("grapevine: {e}"))?;
        check_echo(request, &reply)
    }
}

/// A bare `RpcClient` (one connection to the server per instance).
#[derive(Clone)]
struct RpcCaller {
    rpc: RpcClient,
    server: SocketAddr,
}

impl Caller for RpcCaller {
    async fn call(&self, request: &ByteBuf) -> Result<(), String> {
        let reply: ByteBuf = self
            .rpc
            .call_addr(self.server, "echo", "echo", request, CALL_TIMEOUT)
            .await
            .map_err(|e| format!("grapevine: {e}"))?;
        check_echo(request, &reply)
    }
}

/// `node.client("echo").call`: resolved through the catalog, balanced, retried.
#[derive(Clone)]
struct CatalogCaller {
    client: ServiceClient,
}

impl Caller for CatalogCaller {
    async fn call(&self, request: &ByteBuf) -> Result<(), String> {
        let reply: ByteBuf = self
            .client
            .call("echo", request)
            .await
            .map_err(|e| format!("grapevine (catalog): {e}"))?;
        check_echo(request, &reply)
    }
}

/// Starts the client node, seeded with the server child's node, and waits (bounded) until
/// the echo service has reached the client's catalog.
async fn grapevine_client(server: SocketAddr) -> Result<Arc<Node>, String> {
    let client = Node::builder("bench-client")
        .profile(Profile::Local)
        .seeds([server])
        .start()
        .await
        .map_err(|e| format!("client node: {e}"))?;
    let client = Arc::new(client);
    let catalog = CatalogCaller {
        client: client.client("echo"),
    };
    let request = payload(0);
    let ready = async {
        while catalog.call(&request).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .map_err(|_| "the echo service never reached the client's catalog".to_string())?;
    Ok(client)
}

/// The server node of the grapevine rows (runs in the server child); returns its address.
async fn grapevine_server() -> Result<(SocketAddr, Node), String> {
    let server = Node::builder("bench-server")
        .profile(Profile::Local)
        .start()
        .await
        .map_err(|e| format!("server node: {e}"))?;
    server
        .serve(
            RpcService::new("echo").method("echo", |request: ByteBuf| async move { Ok(request) }),
        )
        .await
        .map_err(|e| format!("serve: {e}"))?;
    Ok((server.addr(), server))
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Row {
    name: &'static str,
    latency: Option<Result<Latency, String>>,
    one_by_64: Option<Result<Rate, String>>,
    eight_by_32: Option<Result<Rate, String>>,
}

fn show<T>(cell: &Option<Result<T, String>>, f: impl Fn(&T) -> String) -> String {
    match cell {
        None => "-".into(),
        Some(Ok(value)) => f(value),
        Some(Err(_)) => "FAILED".into(),
    }
}

fn ok<T: Copy>(cell: &Option<Result<T, String>>) -> Option<T> {
    cell.as_ref().and_then(|c| c.as_ref().ok()).copied()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The best tarpc figure of each column: highest rates, lowest CPU per call.
#[derive(Clone, Copy, Default)]
struct BestTarpc {
    one_by_64: Option<f64>,
    eight_by_32: Option<f64>,
    cpu_one_by_64: Option<f64>,
    cpu_eight_by_32: Option<f64>,
}

fn best_tarpc(rows: &[Row]) -> BestTarpc {
    let pick = |values: Vec<Option<f64>>, higher: bool| {
        values
            .into_iter()
            .flatten()
            .reduce(|a, b| if (b > a) == higher { b } else { a })
    };
    let tarpc: Vec<&Row> = rows
        .iter()
        .filter(|r| r.name.starts_with("tarpc"))
        .collect();
    let rate = |r: &Row, eight: bool| {
        ok(if eight { &r.eight_by_32 } else { &r.one_by_64 }).map(|x| x.per_sec)
    };
    let cpu = |r: &Row, eight: bool| {
        ok(if eight { &r.eight_by_32 } else { &r.one_by_64 }).and_then(|x| x.cpu_us)
    };
    BestTarpc {
        one_by_64: pick(tarpc.iter().map(|r| rate(r, false)).collect(), true),
        eight_by_32: pick(tarpc.iter().map(|r| rate(r, true)).collect(), true),
        cpu_one_by_64: pick(tarpc.iter().map(|r| cpu(r, false)).collect(), false),
        cpu_eight_by_32: pick(tarpc.iter().map(|r| cpu(r, true)).collect(), false),
    }
}

fn print_table(rows: &[Row]) {
    let best = best_tarpc(rows);
    println!(
        "{:<22} {:>7} {:>7} {:>8} {:>11} {:>6} {:>11} {:>6} {:>6} {:>6} {:>6}",
        "system",
        "p50 µs",
        "p99 µs",
        "p99.9µs",
        "calls/s1×64",
        "×tarpc",
        "calls/s8×32",
        "×tarpc",
        "cpuSeq",
        "cpu1×64",
        "cpu8×32"
    );
    println!("{}", "-".repeat(110));
    let cpu = |cpu: Option<f64>| cpu.map_or("?".to_string(), |c| format!("{c:.1}"));
    let times = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    for row in rows {
        println!(
            "{:<22} {:>7} {:>7} {:>8} {:>11} {:>6} {:>11} {:>6} {:>6} {:>6} {:>6}",
            row.name,
            show(&row.latency, |l| format!("{:.1}", l.p50)),
            show(&row.latency, |l| format!("{:.1}", l.p99)),
            show(&row.latency, |l| format!("{:.1}", l.p999)),
            show(&row.one_by_64, |r| format!("{:.0}", r.per_sec)),
            times(ratio(ok(&row.one_by_64).map(|r| r.per_sec), best.one_by_64)),
            show(&row.eight_by_32, |r| format!("{:.0}", r.per_sec)),
            times(ratio(
                ok(&row.eight_by_32).map(|r| r.per_sec),
                best.eight_by_32
            )),
            show(&row.latency, |l| cpu(l.cpu_us)),
            show(&row.one_by_64, |r| cpu(r.cpu_us)),
            show(&row.eight_by_32, |r| cpu(r.cpu_us)),
        );
    }
    for row in rows {
        let errors = [
            (
                "latency",
                &row.latency.as_ref().and_then(|c| c.as_ref().err()),
            ),
            (
                "1×64",
                &row.one_by_64.as_ref().and_then(|c| c.as_ref().err()),
            ),
            (
                "8×32",
                &row.eight_by_32.as_ref().and_then(|c| c.as_ref().err()),
            ),
        ];
        for (what, error) in errors {
            if let Some(error) = error {
                println!("  {} {what} failed: {error}", row.name);
            }
        }
    }
}

/// One target: its name, its ratio in a round, the bound, and whether higher is better.
struct Check {
    what: &'static str,
    target: &'static str,
    bound: f64,
    at_least: bool,
}

const CHECKS: [Check; 6] = [
    Check {
        what: "grapevine / best tarpc throughput (1×64)",
        target: "≥ 2×",
        bound: 2.0,
        at_least: true,
    },
    Check {
        what: "grapevine / best tarpc throughput (8×32)",
        target: "≥ 2×",
        bound: 2.0,
        at_least: true,
    },
    Check {
        what: "grapevine / best tarpc CPU per call (1×64)",
        target: "≤ 0.6×",
        bound: 0.6,
        at_least: false,
    },
    Check {
        what: "grapevine / best tarpc CPU per call (8×32)",
        target: "≤ 0.6×",
        bound: 0.6,
        at_least: false,
    },
    Check {
        what: "grapevine p50 / floor p50",
        target: "≤ 1.1×",
        bound: 1.1,
        at_least: false,
    },
    Check {
        what: "catalog / direct throughput (1×64)",
        target: "≥ 0.9×",
        bound: 0.9,
        at_least: true,
    },
];

/// The ratios of [`CHECKS`] in one round.
fn round_ratios(rows: &[Row]) -> [Option<f64>; 6] {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let (floor, grapevine, catalog) = (find(FLOOR), find(GRAPEVINE), find(CATALOG));
    let best = best_tarpc(rows);
    let rate = |row: Option<&Row>, eight: bool| {
        row.and_then(|r| ok(if eight { &r.eight_by_32 } else { &r.one_by_64 }))
    };
    let p50 = |row: Option<&Row>| row.and_then(|r| ok(&r.latency)).map(|l| l.p50);
    [
        ratio(rate(grapevine, false).map(|r| r.per_sec), best.one_by_64),
        ratio(rate(grapevine, true).map(|r| r.per_sec), best.eight_by_32),
        ratio(
            rate(grapevine, false).and_then(|r| r.cpu_us),
            best.cpu_one_by_64,
        ),
        ratio(
            rate(grapevine, true).and_then(|r| r.cpu_us),
            best.cpu_eight_by_32,
        ),
        ratio(p50(grapevine), p50(floor)),
        ratio(
            rate(catalog, false).map(|r| r.per_sec),
            rate(grapevine, false).map(|r| r.per_sec),
        ),
    ]
}

/// Prints every round's ratio per target and the worst round's verdict; `true` when all
/// targets are met in every round.
fn print_verdicts(rounds: &[[Option<f64>; 6]]) -> bool {
    println!();
    let mut all = true;
    for (i, check) in CHECKS.iter().enumerate() {
        let values: Vec<Option<f64>> = rounds.iter().map(|r| r[i]).collect();
        let worst = values.iter().try_fold(None::<f64>, |worst, v| {
            let v = (*v)?;
            Some(Some(match worst {
                None => v,
                Some(w) if check.at_least => w.min(v),
                Some(w) => w.max(v),
            }))
        });
        let worst = worst.flatten();
        let pass = worst.is_some_and(|w| {
            if check.at_least {
                w >= check.bound
            } else {
                w <= check.bound
            }
        });
        all &= pass;
        let each: Vec<String> = values
            .iter()
            .map(|v| v.map_or("n/a".to_string(), |v| format!("{v:.2}×")))
            .collect();
        println!(
            "{:<44} rounds {:<24} worst {:>7}  target {:<7} {}",
            check.what,
            each.join(" "),
            worst.map_or("n/a".to_string(), |w| format!("{w:.2}×")),
            check.target,
            if pass { "PASS" } else { "MISS" }
        );
    }
    all
}

// ---------------------------------------------------------------------------------------
// Processes: every server runs in a child process of its own
// ---------------------------------------------------------------------------------------

const FLOOR: &str = "floor (raw TCP)";
const TARPC_INLINE: &str = "tarpc 0.37 inline";
const TARPC_BOUNDED: &str = "tarpc 0.37 bounded";
const TONIC: &str = "tonic 0.13 (gRPC)";
const GRAPEVINE: &str = "grapevine";
const CATALOG: &str = "grapevine (catalog)";

/// Systems in the order every round runs them (`BENCH_SYSTEMS` names).
const SYSTEMS: [&str; 5] = [
    "floor",
    "tarpc-inline",
    "tarpc-bounded",
    "tonic",
    "grapevine",
];

/// Which systems to run (`BENCH_SYSTEMS`, comma-separated; default all).
fn wanted(system: &str) -> bool {
    match std::env::var("BENCH_SYSTEMS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == system),
        _ => true,
    }
}

fn step(what: &str) {
    eprintln!("… {what}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The server child (`--serve SYSTEM`): binds, prints `addr <address>`, serves until its
/// stdin closes (the parent exited or finished with it).
fn serve_child(system: &str) -> ! {
    use std::io::Write;
    let rt = runtime();
    let result: Result<SocketAddr, String> = rt.block_on(async {
        match system {
            "grapevine" => {
                let (addr, node) = grapevine_server().await?;
                // Kept alive until the process exits.
                std::mem::forget(node);
                Ok(addr)
            }
            "floor" => floor_server()
                .await
                .map(|(addr, _task)| addr)
                .map_err(|e| e.to_string()),
            _ => {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                match system {
                    "tarpc-inline" => {
                        tokio::spawn(tarpc_echo::serve(listener, TarpcMode::Inline));
                    }
                    "tarpc-bounded" => {
                        tokio::spawn(tarpc_echo::serve(listener, TarpcMode::Bounded));
                    }
                    "tonic" => {
                        tokio::spawn(tonic_echo::serve(listener));
                    }
                    other => return Err(format!("unknown system {other:?}")),
                }
                Ok(addr)
            }
        }
    });
    match result {
        Ok(addr) => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "addr {addr}");
            let _ = out.flush();
            // Blocks until the parent closes the pipe (or dies).
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0)
        }
        Err(error) => {
            eprintln!("server child {system}: {error}");
            std::process::exit(1)
        }
    }
}

/// A running server child; killed when dropped.
struct ServerChild {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ServerChild {
    fn start(system: &str) -> Result<ServerChild, String> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["--serve", system])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning the {system} server: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30));
        let addr = line
            .ok()
            .and_then(|l| l.trim().strip_prefix("addr ")?.parse().ok());
        match addr {
            Some(addr) => Ok(ServerChild { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the {system} server did not report its address"))
            }
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run_floor(addr: SocketAddr, settings: Settings) -> Vec<Row> {
    let mut row = Row {
        name: FLOOR,
        ..Row::default()
    };
    step("floor: sequential");
    row.latency = Some(floor_sequential(addr, settings).await);
    step("floor: 1×64");
    row.one_by_64 = Some(floor_throughput(addr, 1, 64, settings).await);
    step("floor: 8×32");
    row.eight_by_32 = Some(floor_throughput(addr, 8, 32, settings).await);
    vec![row]
}

/// Sequential, 1×64 on one connection, 8×32 on eight: the same for every RPC system.
async fn run_callers<C: Caller, F: Future<Output = Result<C, String>>>(
    name: &'static str,
    connect: impl Fn() -> F,
    settings: Settings,
) -> Row {
    let mut row = Row {
        name,
        ..Row::default()
    };
    let one = match connect().await {
        Ok(one) => one,
        Err(e) => {
            row.latency = Some(Err(e));
            return row;
        }
    };
    step(&format!("{name}: sequential"));
    row.latency = Some(sequential(&one, settings).await);
    step(&format!("{name}: 1×64"));
    row.one_by_64 = Some(throughput(std::slice::from_ref(&one), 64, settings).await);
    let mut eight = Vec::new();
    for _ in 0..8 {
        match connect().await {
            Ok(caller) => eight.push(caller),
            Err(e) => {
                row.eight_by_32 = Some(Err(e));
                return row;
            }
        }
    }
    step(&format!("{name}: 8×32"));
    row.eight_by_32 = Some(throughput(&eight, 32, settings).await);
    row
}

/// The `call_node` row and the catalog-resolved row.
async fn run_grapevine(server: SocketAddr, settings: Settings) -> Result<Vec<Row>, String> {
    step("grapevine: starting the client node");
    let client = grapevine_client(server).await?;
    let direct = NodeCaller {
        node: client.clone(),
        server,
    };
    let mut row = Row {
        name: GRAPEVINE,
        ..Row::default()
    };
    step("grapevine: sequential (call_node)");
    row.latency = Some(sequential(&direct, settings).await);
    step("grapevine: 1×64 (call_node)");
    row.one_by_64 = Some(throughput(std::slice::from_ref(&direct), 64, settings).await);
    let clients: Vec<RpcCaller> = (0..8)
        .map(|seed| RpcCaller {
            rpc: RpcClient::new(
                grapevine::net::TokioTransport,
                grapevine::node::rpc_preface(),
                Arc::new(Nowhere),
                seed,
            ),
            server,
        })
        .collect();
    step("grapevine: 8×32 (8 RpcClients, call_addr)");
    row.eight_by_32 = Some(throughput(&clients, 32, settings).await);
    drop(clients);

    let catalog = CatalogCaller {
        client: client.client("echo"),
    };
    let mut resolved = Row {
        name: CATALOG,
        ..Row::default()
    };
    step("grapevine: sequential (client(\"echo\").call)");
    resolved.latency = Some(sequential(&catalog, settings).await);
    step("grapevine: 1×64 (client(\"echo\").call)");
    resolved.one_by_64 = Some(throughput(std::slice::from_ref(&catalog), 64, settings).await);
    drop((catalog, direct));
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    Ok(vec![row, resolved])
}

/// One system in one round: its server child, and the client side on a fresh runtime here.
fn run_system(system: &str, settings: Settings) -> Result<Vec<Row>, String> {
    let server = ServerChild::start(system)?;
    SERVER_PID.store(server.child.id(), Ordering::Relaxed);
    let addr = server.addr;
    let rt = runtime();
    let rows = rt.block_on(async move {
        match system {
            "floor" => Ok(run_floor(addr, settings).await),
            "tarpc-inline" => Ok(vec![
                run_callers(
                    TARPC_INLINE,
                    || async move { tarpc_echo::connect(addr).await.map_err(|e| e.to_string()) },
                    settings,
                )
                .await,
            ]),
            "tarpc-bounded" => Ok(vec![
                run_callers(
                    TARPC_BOUNDED,
                    || async move { tarpc_echo::connect(addr).await.map_err(|e| e.to_string()) },
                    settings,
                )
                .await,
            ]),
            "tonic" => Ok(vec![
                run_callers(TONIC, || tonic_echo::connect(addr), settings).await,
            ]),
            "grapevine" => run_grapevine(addr, settings).await,
            other => Err(format!("unknown system {other:?}")),
        }
    });
    // Whatever is still running (connection tasks) is dropped here.
    rt.shutdown_timeout(Duration::from_secs(2));
    SERVER_PID.store(0, Ordering::Relaxed);
    drop(server);
    rows
}

fn run(settings: Settings, rounds: usize) -> Result<bool, String> {
    println!(
        "rpc bench: {PAYLOAD}-byte payload over 127.0.0.1 TCP; each server in a child process \
         of its own, the client side in the parent; both on a tokio multi-thread runtime with \
         2 workers\nsequential: {} warm-up + {} measured calls; throughput: {:.1} s warm-up + \
         {:.1} s measured per load; {rounds} rounds, systems interleaved in each",
        settings.warmup, settings.calls, settings.warm_secs, settings.secs
    );
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let mut rows = Vec::new();
        for system in SYSTEMS.iter().filter(|s| wanted(s)) {
            rows.extend(run_system(system, settings)?);
        }
        println!("\nround {round}");
        print_table(&rows);
        ratios.push(round_ratios(&rows));
    }
    println!(
        "\n×tarpc: this row's rate / the best tarpc row's rate in the same round.\n\
         grapevine: Node::call_node for sequential and 1×64; 8 RpcClient instances \
         (call_addr) for 8×32.\ngrapevine (catalog): node.client(\"echo\").call, resolved \
         through the catalog on every call.\nCPU µs per call: all threads of the client \
         process and of the server child together."
    );
    Ok(print_verdicts(&ratios))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--serve") {
        let system = args.get(at + 1).cloned().unwrap_or_default();
        serve_child(&system);
    }
    let settings = Settings::from_env();
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or(3usize)
        .clamp(1, 20);
    match run(settings, rounds) {
        Ok(true) => println!("\nall targets met (worst round)"),
        Ok(false) => println!("\nsome targets missed (worst round)"),
        Err(error) => {
            eprintln!("rpc bench failed: {error}");
            std::process::exit(1);
        }
    }
}
