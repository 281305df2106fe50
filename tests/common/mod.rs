//! Helpers shared by the in-process cluster tests: nodes on loopback with the `Local` profile.
// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use grapevine::{Health, Instance, MemberStatus, Node, NodeBuilder, Profile};

/// The longest any test waits for the cluster to reach a state.
pub const WAIT: Duration = Duration::from_secs(20);

/// A node builder on loopback with fast timings and the given seeds.
pub fn builder(name: &str, seeds: &[SocketAddr]) -> NodeBuilder {
    Node::builder(name)
        .seeds(seeds.iter().copied())
        .profile(Profile::Local)
}

/// Starts a node on loopback with fast timings.
pub async fn start(name: &str, seeds: &[SocketAddr]) -> Node {
    builder(name, seeds).start().await.expect("node starts")
}

/// Starts `size` nodes named `node-0…` that join through the first, and waits until every
/// node sees every other alive.
pub async fn cluster(size: usize) -> Vec<Node> {
    let first = start("node-0", &[]).await;
    let seed = first.addr();
    let mut nodes = vec![first];
    for i in 1..size {
        nodes.push(start(&format!("node-{i}"), &[seed]).await);
    }
    for node in &nodes {
        alive(node, size).await;
    }
    nodes
}

/// Waits (at most `WAIT`) until `node` sees exactly `size` members alive, itself included.
pub async fn alive(node: &Node, size: usize) {
    tokio::time::timeout(
        WAIT,
        node.wait_for_members(|m| {
            m.iter().filter(|m| m.status == MemberStatus::Alive).count() == size
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("{} sees {:?}", node.identity(), node.members()));
}

/// Polls `condition` every 20 ms until it holds; after `WAIT` panics with `what` and the
/// node's catalog and config, which is what these conditions look at.
pub async fn eventually(node: &Node, what: &str, mut condition: impl FnMut(&Node) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition(node) {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{}: {what} not reached; catalog: {:?}; config: {:?}",
                node.identity(),
                summary(&node.catalog().all_instances()),
                node.config().list("")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The catalog as sorted `(service, id, node, health)` rows, for comparisons and messages.
pub fn summary(instances: &[Instance]) -> Vec<(String, String, String, Health)> {
    let mut rows: Vec<_> = instances
        .iter()
        .map(|i| (i.service.clone(), i.id.clone(), i.node.clone(), i.health))
        .collect();
    rows.sort();
    rows
}

/// Waits (up to [`WAIT`]) until `node` looks up exactly `count` instances of `service`.
pub async fn instances_visible(node: &Node, service: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.catalog().lookup(service).len() != count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} never had {count} instances"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
