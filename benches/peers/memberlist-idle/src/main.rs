//! The memberlist crate's idle cluster, measured as grapevine's `idle_traffic` example
//! measures its own: N nodes in one process on loopback, converged, then idle.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use memberlist::net::NetTransportOptions;
use memberlist::proto::MaybeResolvedAddress;
use memberlist::tokio::{TokioNetTransport, TokioSocketAddrResolver, TokioTcp};
use memberlist::Options;
use smol_str::SmolStr;

type Member = memberlist::Memberlist<TokioNetTransport<SmolStr, TokioSocketAddrResolver, TokioTcp>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size = 5usize;
    let mut idle_secs = 30u64;
    let mut settle_secs = 10u64;
    let mut probe_ms = None;
    let mut base_port = 17000u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => size = value()?.parse()?,
            "--idle" => idle_secs = value()?.parse()?,
            "--settle" => settle_secs = value()?.parse()?,
            "--probe-ms" => probe_ms = Some(value()?.parse()?),
            "--base-port" => base_port = value()?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let mut members: Vec<Member> = Vec::new();
    for i in 0..size {
        let addr: SocketAddr = ([127, 0, 0, 1], base_port + i as u16).into();
        let mut transport = NetTransportOptions::new(SmolStr::new(format!("node-{i}")));
        transport.add_bind_address(addr);
        let mut options = Options::lan();
        if let Some(ms) = probe_ms {
            options = options.with_probe_interval(Duration::from_millis(ms));
        }
        let member = Member::new(transport, options).await?;
        if i > 0 {
            let seed: SocketAddr = ([127, 0, 0, 1], base_port).into();
            member
                .join(MaybeResolvedAddress::Resolved(seed))
                .await
                .map_err(|e| format!("join: {e}"))?;
        }
        members.push(member);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for m in &members {
            all &= m.num_online_members().await == size;
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            return Err("memberlist did not converge in 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("converged nodes={size}");
    tokio::time::sleep(Duration::from_secs(settle_secs)).await;
    let before = lo_tx_bytes();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = lo_tx_bytes();
    let mut online = usize::MAX;
    for m in &members {
        online = online.min(m.num_online_members().await);
    }
    println!("nodes={size} idle_s={elapsed:.1} min_online={online}");
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "lo_tx_bytes_per_node_per_s={:.1}",
            (a - b) as f64 / elapsed / size as f64
        );
    }
    for m in &members {
        let _ = m.shutdown().await;
    }
    Ok(())
}

/// Bytes sent on loopback in this process's network namespace (headers included).
fn lo_tx_bytes() -> Option<u64> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").ok()?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    let fields: Vec<&str> = line.split_once(':')?.1.split_whitespace().collect();
    fields.get(8)?.parse().ok()
}
