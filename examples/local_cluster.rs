//! A local cluster in one process: start nodes on 127.0.0.1, each registering an instance of
//! the service `web`; watch membership and the catalog converge, crash one node (and see a
//! catalog watch fire), make one leave, print the member and catalog tables.
//!
//! ```text
//! cargo run --release --example local_cluster [-- --nodes 5 --profile lan]
//! ```

use std::time::{Duration, Instant};

use grapevine::{Member, MemberStatus, Node, Profile, Query, Service};

/// Name of the service every node registers an instance of.
const SERVICE: &str = "web";
/// Port of node-i's instance is `BASE_PORT + i`.
const BASE_PORT: u16 = 8000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut nodes_wanted = 5usize;
    let mut profile = Profile::Lan;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => nodes_wanted = args.next().ok_or("--nodes needs a number")?.parse()?,
            "--profile" => profile = args.next().ok_or("--profile needs a value")?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if nodes_wanted < 3 {
        return Err("--nodes must be at least 3".into());
    }
    if nodes_wanted > usize::from(u16::MAX - BASE_PORT) {
        return Err(format!("--nodes must be at most {}", u16::MAX - BASE_PORT).into());
    }

    println!("starting {nodes_wanted} nodes on 127.0.0.1 ({profile:?} profile), each with a {SERVICE:?} instance");
    let started = Instant::now();
    let first = Node::builder("node-0").profile(profile).start().await?;
    let seed = first.addr();
    let mut nodes = vec![first];
    for i in 1..nodes_wanted {
        let node = Node::builder(format!("node-{i}"))
            .seeds([seed])
            .profile(profile)
            .start()
            .await?;
        nodes.push(node);
    }
    for (i, node) in nodes.iter().enumerate() {
        let name = node.identity().name;
        let port = BASE_PORT + u16::try_from(i)?;
        let mut service = Service::new(SERVICE, format!("{SERVICE}-{name}"), port);
        service.tags = vec![zone(i).to_string()];
        node.register(service).await?;
    }
    for node in &nodes {
        within(
            Duration::from_secs(60),
            format!(
                "{} to see {nodes_wanted} alive members",
                node.identity().name
            ),
            node.wait_for_members(|m| alive(m) == nodes_wanted),
        )
        .await?;
    }
    println!(
        "converged: every node sees {nodes_wanted} alive members after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    for node in &nodes {
        wait_for_instances(node, nodes_wanted).await?;
    }
    println!(
        "catalog: every node looks up {nodes_wanted} {SERVICE:?} instances after {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // Watch `web` on node-0 across the crash; the first value is the current set.
    let observer = nodes[0].identity().name;
    let mut watch = nodes[0].catalog().watch(SERVICE);
    let current = within(
        Duration::from_secs(5),
        format!("the first value of the {SERVICE:?} watch on {observer}"),
        watch.next(),
    )
    .await?
    .ok_or(format!("{observer} stopped"))?;
    println!(
        "watching {SERVICE:?} on {observer}: {} instances now",
        current.len()
    );

    let victim = nodes.pop().ok_or("no node")?;
    let victim_name = victim.identity().name;
    println!("crashing {victim_name} (no goodbye)");
    let crashed_at = Instant::now();
    let watcher = tokio::spawn(within(
        Duration::from_secs(60),
        format!("the {SERVICE:?} watch on {observer} to drop {victim_name}'s instance"),
        async move {
            let mut fires = 0;
            while let Some(instances) = watch.next().await {
                fires += 1;
                if instances.len() < nodes_wanted {
                    return Some((crashed_at.elapsed(), fires, instances));
                }
            }
            None
        },
    ));
    drop(victim);
    for node in &nodes {
        within(
            Duration::from_secs(60),
            format!("{} to see {victim_name} down", node.identity().name),
            node.wait_for_members(|m| status(m, &victim_name) == Some(MemberStatus::Down)),
        )
        .await?;
    }
    println!(
        "{victim_name} marked down by every other node after {:.2} s",
        crashed_at.elapsed().as_secs_f64()
    );
    let (fired_after, fires, instances) = watcher.await??.ok_or(format!("{observer} stopped"))?;
    if instances.iter().any(|i| i.node == victim_name) {
        return Err(format!(
            "the watch on {observer} dropped another instance than {victim_name}'s"
        )
        .into());
    }
    println!(
        "watch on {observer} fired {:.2} s after the crash: {} {SERVICE:?} instances, {victim_name}'s gone{}",
        fired_after.as_secs_f64(),
        instances.len(),
        if fires > 1 {
            format!(" ({} earlier updates kept it)", fires - 1)
        } else {
            String::new()
        },
    );
    let zone_a = nodes[0]
        .catalog()
        .lookup_with(SERVICE, &Query::default().tag(zone(0)));
    let mut shown: Vec<String> = zone_a.iter().take(4).map(|i| i.id.clone()).collect();
    if zone_a.len() > shown.len() {
        shown.push(format!("... {} more", zone_a.len() - shown.len()));
    }
    println!(
        "lookup_with({SERVICE:?}, tag {:?}) on {observer}: {} instances ({})",
        zone(0),
        zone_a.len(),
        shown.join(", ")
    );

    let leaver = nodes.pop().ok_or("no node")?;
    let leaver_name = leaver.identity().name;
    println!("{leaver_name} leaves gracefully");
    let left_at = Instant::now();
    leaver.leave().await?;
    for node in &nodes {
        within(
            Duration::from_secs(30),
            format!("{} to see {leaver_name} left", node.identity().name),
            node.wait_for_members(|m| status(m, &leaver_name) == Some(MemberStatus::Left)),
        )
        .await?;
    }
    let seen_left = left_at.elapsed();
    // The catalog view follows the member list: wait until lookups drop the instance too.
    for node in &nodes {
        wait_for_instances(node, nodes_wanted - 2).await?;
    }
    println!(
        "{leaver_name} seen as left by every other node after {:.3} s, its {SERVICE:?} instance gone from every lookup after {:.3} s",
        seen_left.as_secs_f64(),
        left_at.elapsed().as_secs_f64()
    );

    println!("\nmember table of {observer}:");
    println!("{:<10} {:<21} {:<8} GENERATION", "NAME", "ADDR", "STATUS");
    for m in nodes[0].members() {
        println!(
            "{:<10} {:<21} {:<8} {}",
            m.name,
            m.addr.to_string(),
            m.status.to_string(),
            m.generation
        );
    }

    println!(
        "\ncatalog table of {observer} ({} {SERVICE:?} instances answer lookups):",
        nodes[0].catalog().lookup(SERVICE).len()
    );
    println!(
        "{:<8} {:<14} {:<10} {:<21} {:<8} NODE STATUS",
        "SERVICE", "ID", "NODE", "ADDR", "HEALTH"
    );
    for i in nodes[0].catalog().all_instances() {
        println!(
            "{:<8} {:<14} {:<10} {:<21} {:<8} {}",
            i.service,
            i.id,
            i.node,
            i.socket_addr().to_string(),
            i.health.to_string(),
            i.node_status
        );
    }
    for node in &nodes {
        node.leave().await?;
    }
    Ok(())
}

/// Waits until `node` looks up exactly `count` passing instances of [`SERVICE`].
async fn wait_for_instances(node: &Node, count: usize) -> Result<(), String> {
    let name = node.identity().name;
    let mut watch = node.catalog().watch(SERVICE);
    let reached = within(
        Duration::from_secs(60),
        format!("{name} to look up {count} {SERVICE:?} instances"),
        async {
            while let Some(instances) = watch.next().await {
                if instances.len() == count {
                    return true;
                }
            }
            false
        },
    )
    .await?;
    if reached {
        Ok(())
    } else {
        Err(format!(
            "{name} stopped while waiting for {count} {SERVICE:?} instances"
        ))
    }
}

/// The zone tag of node-i's instance.
fn zone(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "zone-a"
    } else {
        "zone-b"
    }
}

fn alive(members: &[Member]) -> usize {
    members
        .iter()
        .filter(|m| m.status == MemberStatus::Alive)
        .count()
}

fn status(members: &[Member], name: &str) -> Option<MemberStatus> {
    members.iter().find(|m| m.name == name).map(|m| m.status)
}

/// Runs `future` for at most `limit`; the error names what was waited for.
async fn within<T, F: std::future::Future<Output = T>>(
    limit: Duration,
    what: String,
    future: F,
) -> Result<T, String> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| format!("timed out after {limit:?} waiting for {what}"))
}
