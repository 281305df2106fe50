//! Measures a cluster on loopback: join convergence, how long a registration takes to reach
//! every node, and the idle traffic per node (gossip + anti-entropy).
//!
//! ```text
//! cargo run --release --example cluster_figures -- --nodes 50 --services 5 --idle 20
//! ```

use std::time::{Duration, Instant};

use grapevine::{MemberStatus, Node, Profile, Service};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size = 10usize;
    let mut services = 5u16;
    let mut idle_secs = 20u64;
    let mut keys = 0usize;
    let mut profile = Profile::Lan;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => size = value()?.parse()?,
            "--services" => services = value()?.parse()?,
            "--idle" => idle_secs = value()?.parse()?,
            "--profile" => profile = value()?.parse()?,
            "--keys" => keys = value()?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }

    let started = Instant::now();
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
    println!(
        "nodes={size} profile={profile:?} join_converged_s={:.2}",
        started.elapsed().as_secs_f64()
    );

    for (i, node) in nodes.iter().enumerate() {
        for s in 0..services {
            let service = Service::new(format!("svc-{s}"), format!("svc-{s}-{i}"), 10_000 + s);
            node.register(service).await?;
        }
    }
    let expected = size * usize::from(services);
    let deadline = Instant::now() + Duration::from_secs(120);
    while nodes
        .iter()
        .any(|n| n.catalog().all_instances().len() != expected)
    {
        if Instant::now() > deadline {
            return Err("catalog did not converge".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One registration, timed until every node's watch shows it.
    let mut watches: Vec<_> = nodes.iter().map(|n| n.catalog().watch("probe")).collect();
    for watch in &mut watches {
        watch.next().await;
    }
    let registered = Instant::now();
    nodes[size / 2]
        .register(Service::new("probe", "probe-1", 9999))
        .await?;
    let waiters: Vec<_> = watches
        .into_iter()
        .map(|mut watch| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(60), watch.next())
                    .await
                    .map(|_| registered.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut reached = Vec::with_capacity(size);
    for waiter in waiters {
        reached.push(waiter.await?.map_err(|_| "registration did not spread")?);
    }
    reached.sort_by(f64::total_cmp);
    println!(
        "registration_reached_all_s={:.3} median_s={:.3}",
        reached[reached.len() - 1],
        reached[reached.len() / 2]
    );

    // One config write, timed until every node's prefix watch yields it.
    let mut config_watches: Vec<_> = nodes
        .iter()
        .map(|n| n.config().watch_prefix("prod/probe"))
        .collect();
    let written = Instant::now();
    nodes[size / 3]
        .config()
        .set_str("prod/probe/flag", "on")
        .await?;
    let waiters: Vec<_> = config_watches
        .drain(..)
        .map(|mut watch| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(60), watch.next())
                    .await
                    .map(|_| written.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut fired = Vec::with_capacity(size);
    for waiter in waiters {
        fired.push(waiter.await?.map_err(|_| "config write did not spread")?);
    }
    fired.sort_by(f64::total_cmp);
    println!(
        "config_watch_fired_everywhere_s={:.3} median_s={:.3}",
        fired[fired.len() - 1],
        fired[fired.len() / 2]
    );

    let before: Vec<_> = nodes.iter().map(|n| n.stats()).collect();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let mut udp = 0u64;
    let mut tcp = 0u64;
    for (node, before) in nodes.iter().zip(&before) {
        let after = node.stats();
        udp += after.udp_sent_bytes - before.udp_sent_bytes;
        tcp += after.tcp_bytes - before.tcp_bytes;
    }
    // tcp_bytes counts both ends of an exchange; halve it to get bytes put on the wire.
    let per_node = |bytes: u64| bytes as f64 / size as f64 / idle_secs as f64;
    println!(
        "idle_bytes_per_node_per_s={:.0} (udp_gossip={:.0} tcp_sync={:.0}) over {idle_secs} s with {services} services per node",
        per_node(udp + tcp / 2),
        per_node(udp),
        per_node(tcp / 2)
    );

    if keys > 0 {
        let config = nodes[0].config();
        for i in 0..keys {
            config
                .set_str(&format!("prod/bulk/key{i:06}"), "a-value-of-moderate-size")
                .await?;
        }
        let all = |n: &Node| n.config().list("prod/bulk").len() == keys;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !nodes.iter().all(all) {
            if Instant::now() > deadline {
                return Err("keys did not spread".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let joined = Instant::now();
        let fresh = Node::builder("fresh")
            .seeds([nodes[1].addr()])
            .profile(profile)
            .start()
            .await?;
        while !all(&fresh) {
            if Instant::now() > deadline {
                return Err("fresh node did not catch up".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let caught_up = joined.elapsed().as_secs_f64();
        // Settle, so the count includes the exchange that delivered the last keys.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stats = fresh.stats();
        println!(
            "fresh_node_caught_up_with_{keys}_keys_s={caught_up:.2} tcp_bytes={} udp_received_bytes={}",
            stats.tcp_bytes, stats.udp_received_bytes
        );
    }
    Ok(())
}
