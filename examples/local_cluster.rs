//! A local cluster in one process: start nodes on 127.0.0.1, watch them converge, crash one,
//! make one leave, print the member table.
//!
//! ```text
//! cargo run --release --example local_cluster [-- --nodes 5 --profile lan]
//! ```

use std::time::{Duration, Instant};

use grapevine::{Member, MemberStatus, Node, Profile};

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

    println!("starting {nodes_wanted} nodes on 127.0.0.1 ({profile:?} profile)");
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
    for node in &nodes {
        within(
            Duration::from_secs(60),
            node.wait_for_members(|m| alive(m) == nodes_wanted),
        )
        .await?;
    }
    println!(
        "converged: every node sees {nodes_wanted} alive members after {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let victim = nodes.pop().ok_or("no node")?;
    let victim_name = victim.identity().name;
    println!("crashing {victim_name} (no goodbye)");
    let crashed_at = Instant::now();
    drop(victim);
    for node in &nodes {
        within(
            Duration::from_secs(60),
            node.wait_for_members(|m| status(m, &victim_name) == Some(MemberStatus::Down)),
        )
        .await?;
    }
    println!(
        "{victim_name} marked down by every other node after {:.2} s",
        crashed_at.elapsed().as_secs_f64()
    );

    let leaver = nodes.pop().ok_or("no node")?;
    let leaver_name = leaver.identity().name;
    println!("{leaver_name} leaves gracefully");
    let left_at = Instant::now();
    leaver.leave().await?;
    for node in &nodes {
        within(
            Duration::from_secs(30),
            node.wait_for_members(|m| status(m, &leaver_name) == Some(MemberStatus::Left)),
        )
        .await?;
    }
    println!(
        "{leaver_name} seen as left by every other node after {:.3} s",
        left_at.elapsed().as_secs_f64()
    );

    println!("\nmember table of {}:", nodes[0].identity().name);
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
    for node in &nodes {
        node.leave().await?;
    }
    Ok(())
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

async fn within<F: std::future::Future<Output = ()>>(
    limit: Duration,
    future: F,
) -> Result<(), String> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| format!("not reached within {limit:?}"))
}
