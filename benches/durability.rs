//! What a data dir costs: `cargo bench --bench durability`.
//!
//! - `config set` through the library on one node, without and with a data dir, one writer
//!   at a time and 64 at once: acknowledged writes per second, p50 and p99 latency;
//! - restart time of a node with 10,000 keys in its data dir, and the dir's size on disk;
//! - RSS of an idle agent process with `--data-dir`.
//!
//! Figures depend on the disk's fsync latency; run both modes in one run and compare them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine::{Node, Profile};

const SEQUENTIAL_WRITES: usize = 2_000;
const WRITERS: usize = 64;
const WRITES_PER_WRITER: usize = 100;
const RESTART_KEYS: usize = 10_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(mode: &str, shape: &str, mut latencies: Vec<Duration>, wall: Duration) {
    latencies.sort();
    println!(
        "{mode:<10} {shape:<12} {:>8.0} writes/s   p50 {:>8.1} µs   p99 {:>8.1} µs   ({} writes)",
        latencies.len() as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        latencies.len()
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("grapevine-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn node(data_dir: Option<&Path>) -> Node {
    let mut builder = Node::builder("bench").profile(Profile::Local);
    if let Some(dir) = data_dir {
        builder = builder.data_dir(dir);
    }
    builder.start().await.expect("node starts")
}

async fn writes(mode: &str, data_dir: Option<&Path>) {
    let node = Arc::new(node(data_dir).await);
    let value = vec![b'v'; 100];
    let mut latencies = Vec::with_capacity(SEQUENTIAL_WRITES);
    let started = Instant::now();
    for i in 0..SEQUENTIAL_WRITES {
        let at = Instant::now();
        node.config()
            .set(&format!("bench/seq/{i}"), value.clone())
            .await
            .expect("set");
        latencies.push(at.elapsed());
    }
    report(mode, "sequential", latencies, started.elapsed());

    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let node = node.clone();
            let value = value.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(WRITES_PER_WRITER);
                for i in 0..WRITES_PER_WRITER {
                    let at = Instant::now();
                    node.config()
                        .set(&format!("bench/par/{writer}/{i}"), value.clone())
                        .await
                        .expect("set");
                    latencies.push(at.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("writer"));
    }
    report(mode, "64 writers", latencies, started.elapsed());
    node.shutdown().await;
}

async fn restart() {
    let dir = scratch("restart");
    {
        let node = node(Some(&dir)).await;
        let entries = (0..RESTART_KEYS).map(|i| (format!("bench/keys/{i:05}"), vec![b'v'; 100]));
        node.config().set_all(entries).await.expect("import");
        node.shutdown().await;
    }
    let size = dir_size(&dir);
    let started = Instant::now();
    let node = node(Some(&dir)).await;
    let took = started.elapsed();
    assert_eq!(node.config().key_count(), RESTART_KEYS);
    println!(
        "restart with {RESTART_KEYS} keys (100-byte values): start() took {:.1} ms; data dir {:.2} MB on disk",
        took.as_secs_f64() * 1e3,
        size as f64 / 1e6
    );
    node.shutdown().await;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

fn idle_agent_rss() {
    let dir = scratch("agent");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_grapevine"))
        .args([
            "agent",
            "--name",
            "idle",
            "--bind",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--data-dir", &dir.display().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agent");
    std::thread::sleep(Duration::from_secs(5));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: unknown");
    println!(
        "idle agent with --data-dir, after 5 s: {}",
        rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        writes("memory", None).await;
        let dir = scratch("writes");
        writes("data dir", Some(&dir)).await;
        let _ = std::fs::remove_dir_all(&dir);
        restart().await;
    });
    idle_agent_rss();
}
