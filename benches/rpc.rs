//! RPC benchmark: grapevine against a raw TCP echo (the floor) and tarpc, in one run.
//!
//! All three systems echo a 64-byte payload over 127.0.0.1 TCP, client and server in this
//! process on one tokio runtime with 2 worker threads. For each system it measures:
//!
//! * sequential latency: a warm-up, then calls one after another (p50, p99, p99.9);
//! * throughput with 1 connection and 64 calls in flight;
//! * throughput with 8 connections and 32 calls in flight on each.
//!
//! Run with `cargo bench --bench rpc`. Knobs (environment variables):
//!
//! * `BENCH_SECS`: seconds each throughput load is measured (default 5);
//! * `BENCH_WARM_SECS`: seconds of load before measuring starts (default 1, at most a
//!   fifth of `BENCH_SECS`);
//! * `BENCH_CALLS`: sequential calls measured (default 20000);
//! * `BENCH_WARMUP`: sequential calls before measuring (default 2000);
//! * `BENCH_SYSTEMS`: which of `floor,tarpc,grapevine` to run (default all).
//!
//! Every loop is bounded in time; the process exits when done.

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

/// CPU time used so far by every thread of this process, in nanoseconds (Linux only; the
/// machine may be shared, so CPU per call is steadier than wall-clock rates).
fn cpu_nanos() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
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

    /// Serves `Echo` over TCP with the Bincode codec, one channel per connection and one
    /// task per request (as tarpc's examples do).
    pub async fn server() -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut channels = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                // Same socket option as the floor and grapevine (tarpc's own TCP helpers
                // leave Nagle on); otherwise what `serde_transport::tcp::listen` builds.
                let _ = stream.set_nodelay(true);
                let framed = LengthDelimitedCodec::builder().new_framed(stream);
                let transport = tarpc::serde_transport::new(framed, Bincode::default());
                let channel = tarpc::server::BaseChannel::with_defaults(transport);
                channels.spawn(channel.execute(EchoServer.serve()).for_each(
                    |response| async move {
                        tokio::spawn(response);
                    },
                ));
            }
        });
        Ok((addr, task))
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

struct Grapevine {
    server: Arc<Node>,
    client: Arc<Node>,
}

async fn grapevine_nodes() -> Result<Grapevine, String> {
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
    let client = Node::builder("bench-client")
        .profile(Profile::Local)
        .seeds([server.addr()])
        .start()
        .await
        .map_err(|e| format!("client node: {e}"))?;
    let nodes = Grapevine {
        server: Arc::new(server),
        client: Arc::new(client),
    };
    // The catalog path needs the service to reach the client's catalog: bounded wait.
    let catalog = CatalogCaller {
        client: nodes.client.client("echo"),
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
    Ok(nodes)
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

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<20} {:>8} {:>8} {:>9} {:>13} {:>13} {:>7} {:>7} {:>7}",
        "", "", "", "", "", "", "CPU µs", "per", "call"
    );
    println!(
        "{:<20} {:>8} {:>8} {:>9} {:>13} {:>13} {:>7} {:>7} {:>7}",
        "system",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "calls/s 1×64",
        "calls/s 8×32",
        "seq",
        "1×64",
        "8×32"
    );
    println!("{}", "-".repeat(100));
    let cpu = |cpu: Option<f64>| cpu.map_or("?".to_string(), |c| format!("{c:.1}"));
    for row in rows {
        println!(
            "{:<20} {:>8} {:>8} {:>9} {:>13} {:>13} {:>7} {:>7} {:>7}",
            row.name,
            show(&row.latency, |l| format!("{:.1}", l.p50)),
            show(&row.latency, |l| format!("{:.1}", l.p99)),
            show(&row.latency, |l| format!("{:.1}", l.p999)),
            show(&row.one_by_64, |r| format!("{:.0}", r.per_sec)),
            show(&row.eight_by_32, |r| format!("{:.0}", r.per_sec)),
            show(&row.latency, |l| cpu(l.cpu_us)),
            show(&row.one_by_64, |r| cpu(r.cpu_us)),
            show(&row.eight_by_32, |r| cpu(r.cpu_us)),
        );
    }
    for row in rows {
        let errors = [
            (
                "latency",
                row.latency.as_ref().and_then(|c| c.as_ref().err()),
            ),
            (
                "1×64",
                row.one_by_64.as_ref().and_then(|c| c.as_ref().err()),
            ),
            (
                "8×32",
                row.eight_by_32.as_ref().and_then(|c| c.as_ref().err()),
            ),
        ];
        for (what, error) in errors {
            if let Some(error) = error {
                println!("  {} {what} failed: {error}", row.name);
            }
        }
    }
}

/// Prints each target with PASS/MISS; `true` when all pass.
fn print_verdicts(floor: &Row, tarpc: &Row, grapevine: &Row) -> bool {
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let rate = |row: &Row, load: fn(&Row) -> &Option<Result<Rate, String>>| {
        ok(load(row)).map(|r| r.per_sec)
    };
    let p50 = |row: &Row| ok(&row.latency).map(|l| l.p50);
    let checks: [(&str, Option<f64>, &str, bool); 3] = {
        let one = div(
            rate(grapevine, |r| &r.one_by_64),
            rate(tarpc, |r| &r.one_by_64),
        );
        let eight = div(
            rate(grapevine, |r| &r.eight_by_32),
            rate(tarpc, |r| &r.eight_by_32),
        );
        let latency = div(p50(grapevine), p50(floor));
        [
            (
                "grapevine / tarpc throughput (1×64)",
                one,
                "≥ 1.5×",
                one.is_some_and(|r| r >= 1.5),
            ),
            (
                "grapevine / tarpc throughput (8×32)",
                eight,
                "≥ 1.5×",
                eight.is_some_and(|r| r >= 1.5),
            ),
            (
                "grapevine p50 / floor p50",
                latency,
                "≤ 1.2×",
                latency.is_some_and(|r| r <= 1.2),
            ),
        ]
    };
    println!();
    for (what, ratio, target, pass) in &checks {
        let ratio = ratio.map_or("n/a".to_string(), |r| format!("{r:.2}×"));
        let verdict = if *pass { "PASS" } else { "MISS" };
        println!("{what:<38} {ratio:>7}   target {target:<8} {verdict}");
    }
    checks.iter().all(|check| check.3)
}

// ---------------------------------------------------------------------------------------

/// Which systems to run (`BENCH_SYSTEMS`, comma-separated; default all three).
fn wanted(system: &str) -> bool {
    match std::env::var("BENCH_SYSTEMS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == system),
        _ => true,
    }
}

fn step(what: &str) {
    eprintln!("… {what}");
}

async fn run_floor(settings: Settings) -> Result<Row, String> {
    let (addr, server) = floor_server().await.map_err(|e| e.to_string())?;
    let mut row = Row {
        name: "floor (raw TCP)",
        ..Row::default()
    };
    step("floor: sequential");
    row.latency = Some(floor_sequential(addr, settings).await);
    step("floor: 1×64");
    row.one_by_64 = Some(floor_throughput(addr, 1, 64, settings).await);
    step("floor: 8×32");
    row.eight_by_32 = Some(floor_throughput(addr, 8, 32, settings).await);
    server.abort();
    Ok(row)
}

async fn run_tarpc(settings: Settings) -> Result<Row, String> {
    let (addr, server) = tarpc_echo::server().await.map_err(|e| e.to_string())?;
    let mut row = Row {
        name: "tarpc 0.37",
        ..Row::default()
    };
    let one = tarpc_echo::connect(addr).await.map_err(|e| e.to_string())?;
    step("tarpc: sequential");
    row.latency = Some(sequential(&one, settings).await);
    step("tarpc: 1×64");
    row.one_by_64 = Some(throughput(std::slice::from_ref(&one), 64, settings).await);
    let mut eight = Vec::new();
    for _ in 0..8 {
        eight.push(tarpc_echo::connect(addr).await.map_err(|e| e.to_string())?);
    }
    step("tarpc: 8×32");
    row.eight_by_32 = Some(throughput(&eight, 32, settings).await);
    drop((one, eight));
    server.abort();
    Ok(row)
}

/// The `call_node` row and the catalog-resolved row.
async fn run_grapevine(settings: Settings) -> Result<(Row, Row), String> {
    step("grapevine: starting two nodes");
    let nodes = grapevine_nodes().await?;
    let server = nodes.server.addr();
    let direct = NodeCaller {
        node: nodes.client.clone(),
        server,
    };
    let mut row = Row {
        name: "grapevine",
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
        client: nodes.client.client("echo"),
    };
    let mut resolved = Row {
        name: "grapevine (catalog)",
        ..Row::default()
    };
    step("grapevine: sequential (client(\"echo\").call)");
    resolved.latency = Some(sequential(&catalog, settings).await);
    step("grapevine: 1×64 (client(\"echo\").call)");
    resolved.one_by_64 = Some(throughput(std::slice::from_ref(&catalog), 64, settings).await);
    drop((catalog, direct));
    for node in [&nodes.client, &nodes.server] {
        let _ = tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await;
    }
    Ok((row, resolved))
}

async fn run(settings: Settings) -> Result<(), String> {
    println!(
        "rpc bench: {PAYLOAD}-byte payload over 127.0.0.1 TCP, tokio multi-thread runtime \
         with 2 workers\nsequential: {} warm-up + {} measured calls; throughput: {:.1} s \
         warm-up + {:.1} s measured per load",
        settings.warmup, settings.calls, settings.warm_secs, settings.secs
    );
    let skipped = |name| Row {
        name,
        ..Row::default()
    };
    let floor = if wanted("floor") {
        run_floor(settings).await?
    } else {
        skipped("floor (raw TCP)")
    };
    let tarpc = if wanted("tarpc") {
        run_tarpc(settings).await?
    } else {
        skipped("tarpc 0.37")
    };
    let (grapevine, resolved) = if wanted("grapevine") {
        run_grapevine(settings).await?
    } else {
        (skipped("grapevine"), skipped("grapevine (catalog)"))
    };

    let rows = [floor, tarpc, grapevine, resolved];
    print_table(&rows);
    println!(
        "\ngrapevine: Node::call_node for sequential and 1×64; 8 RpcClient instances \
         (call_addr) for 8×32.\ngrapevine (catalog): node.client(\"echo\").call, resolved \
         through the catalog on every call.\nCPU µs per call: all threads of this process \
         (client and server side together)."
    );
    let [floor, tarpc, grapevine, _] = &rows;
    if print_verdicts(floor, tarpc, grapevine) {
        println!("\nall targets met");
    } else {
        println!("\nsome targets missed");
    }
    Ok(())
}

fn main() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(settings));
    // Whatever is still running (accept loops, connection tasks) is dropped here.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Err(error) = result {
        eprintln!("rpc bench failed: {error}");
        std::process::exit(1);
    }
}
