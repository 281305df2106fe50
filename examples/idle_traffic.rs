//! What an idle cluster costs: N in-process nodes on loopback with no services and no config
//! keys, measured once converged and past the join's follow-ups. Prints the bytes each node
//! sends per second (UDP gossip, and TCP push-pull plus anti-entropy), its exchanges per
//! second against their schedule, the starts the rate limit refused, and the process's CPU
//! time (Linux), so that the figures compare with other implementations' on one machine.
//!
//! ```text
//! cargo run --release --example idle_traffic -- --nodes 20 --idle 30
//! ```

use std::time::{Duration, Instant};

use grapevine::{MemberStatus, Node, Profile, StatsSnapshot};

/// The process's user + system CPU time, from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Bytes sent on loopback in this process's network namespace, from `/proc/self/net/dev`.
fn lo_tx_bytes() -> Option<u64> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").ok()?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    let counters: Vec<&str> = line.split_once(':')?.1.split_whitespace().collect();
    // Receive has 8 counters; transmit bytes come next.
    counters.get(8)?.parse().ok()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size = 5usize;
    let mut idle_secs = 30u64;
    let mut settle_secs = 10u64;
    let mut profile = Profile::Lan;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => size = value()?.parse()?,
            "--idle" => idle_secs = value()?.parse()?,
            "--settle" => settle_secs = value()?.parse()?,
            "--profile" => profile = value()?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if size < 2 || idle_secs == 0 {
        return Err("need --nodes ≥ 2 and --idle ≥ 1".into());
    }

    let first = Node::builder("node-0").profile(profile).start().await?;
    let seed = first.addr();
    let mut nodes = vec![first];
    for i in 1..size {
        let node = Node::builder(format!("node-{i}"))
            .seeds([seed])
            .profile(profile)
            .start()
            .await?;
        nodes.push(node);
    }
    for node in &nodes {
        let all_alive = node.wait_for_members(|m| {
            m.iter().filter(|m| m.status == MemberStatus::Alive).count() == size
        });
        tokio::time::timeout(Duration::from_secs(120), all_alive)
            .await
            .map_err(|_| "membership did not converge")?;
    }
    // Past the join's follow-up push-pulls (1, 3 and 7 s after first contact).
    tokio::time::sleep(Duration::from_secs(settle_secs)).await;

    let before: Vec<StatsSnapshot> = nodes.iter().map(Node::stats).collect();
    let lo_before = lo_tx_bytes();
    let cpu_before = cpu_time();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before).as_secs_f64() / elapsed);
    let after: Vec<StatsSnapshot> = nodes.iter().map(Node::stats).collect();
    let lo_sent = lo_tx_bytes()
        .zip(lo_before)
        .map(|(after, before)| after.saturating_sub(before));

    let sum = |f: fn(&StatsSnapshot) -> u64| -> f64 {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| f(a).saturating_sub(f(b)))
            .sum::<u64>() as f64
    };
    let per_node_s = |total: f64| total / size as f64 / elapsed;
    let udp = sum(|s| s.udp_sent_bytes);
    // tcp_bytes counts both directions at both ends: halve it for bytes put on the wire.
    let tcp = sum(|s| s.tcp_bytes) / 2.0;
    let rounds = sum(|s| s.sync_ok + s.sync_failed);
    // Both ends count a push-pull.
    let push_pulls = sum(|s| s.push_pull_ok + s.push_pull_skipped) / 2.0;
    let suppressed = sum(|s| s.sync_suppressed + s.push_pull_suppressed);
    println!("nodes={size} profile={profile:?} idle_s={elapsed:.1}");
    println!(
        "idle_bytes_per_node_per_s={:.0} udp={:.0} tcp={:.0}",
        per_node_s(udp + tcp),
        per_node_s(udp),
        per_node_s(tcp)
    );
    println!(
        "udp_packets_per_node_per_s={:.2}",
        per_node_s(sum(|s| s.udp_sent))
    );
    println!(
        "anti_entropy_per_node_per_s={:.3} (schedule {:.3}) push_pulls_per_node_per_s={:.3} (schedule ≤ {:.3}) suppressed={suppressed}",
        per_node_s(rounds),
        1.0 / profile.sync_interval().as_secs_f64(),
        per_node_s(push_pulls),
        1.0 / profile.push_pull_interval().as_secs_f64()
    );
    // Headers included and counted by the kernel: the measure other implementations share.
    // Only this process's traffic when it runs alone in a network namespace
    // (scripts/idle_vs_memberlist.py does that).
    if let Some(sent) = lo_sent {
        println!(
            "lo_tx_bytes_per_node_per_s={:.1} (loopback of this network namespace)",
            per_node_s(sent as f64)
        );
    }
    match cpu {
        Some(cores) => println!("cpu_cores={cores:.3} (whole process, {size} nodes)"),
        None => println!("cpu_cores=n/a"),
    }
    for node in &nodes {
        node.shutdown().await;
    }
    Ok(())
}
