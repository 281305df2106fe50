//! The configuration store across in-process clusters on loopback.

use std::time::Duration;

use grapevine::net::faulty::{Faults, FaultyTransport};
use grapevine::net::TokioTransport;
use grapevine::{ConfigEvent, MemberStatus, Node, NodeBuilder};

mod common;

use common::{alive, builder, eventually, WAIT};

async fn cluster_of(
    builders: Vec<NodeBuilder>,
    faults: Option<&std::sync::Arc<Faults>>,
) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for builder in builders {
        let builder = match nodes.first() {
            Some(first) => builder.seeds([first.addr()]),
            None => builder,
        };
        let node = match faults {
            Some(faults) => builder
                .start_on(FaultyTransport::new(TokioTransport, faults.clone()))
                .await
                .unwrap(),
            None => builder.start().await.unwrap(),
        };
        nodes.push(node);
    }
    let size = nodes.len();
    for node in &nodes {
        alive(node, size).await;
    }
    nodes
}

async fn cluster(size: usize) -> Vec<Node> {
    cluster_of(
        (0..size)
            .map(|i| builder(&format!("node-{i}"), &[]))
            .collect(),
        None,
    )
    .await
}

fn value(node: &Node, key: &str) -> Option<String> {
    node.config().get_str(key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_list_delete_reach_every_node() {
    let nodes = cluster(6).await;
    let config = nodes[2].config();
    config.set_str("prod/orders/max_conn", "100").await.unwrap();
    config
        .set_json("prod/orders/limits", &vec![1, 2, 3])
        .await
        .unwrap();
    config
        .set_str("staging/orders/max_conn", "5")
        .await
        .unwrap();
    for node in &nodes {
        eventually(node, "three keys", |n| n.config().list("").len() == 3).await;
        assert_eq!(value(node, "prod/orders/max_conn").as_deref(), Some("100"));
        assert_eq!(
            node.config()
                .get_as::<Vec<u32>>("prod/orders/limits")
                .unwrap(),
            Some(vec![1, 2, 3])
        );
        let prod: Vec<String> = node
            .config()
            .list("prod")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(prod, ["prod/orders/limits", "prod/orders/max_conn"]);
    }
    assert!(nodes[4]
        .config()
        .delete("prod/orders/max_conn")
        .await
        .unwrap());
    assert!(!nodes[4]
        .config()
        .delete("prod/orders/absent")
        .await
        .unwrap());
    for node in &nodes {
        eventually(node, "deleted", |n| {
            value(n, "prod/orders/max_conn").is_none()
        })
        .await;
    }

    // Limits give clear errors.
    let error = config
        .set("prod/x", vec![0u8; 64 * 1024 + 1])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("65536"), "{error}");
    let long_key = format!("prod/{}", "k".repeat(600));
    let error = config.set(&long_key, "v").await.unwrap_err();
    assert!(error.to_string().contains("512"), "{error}");
    // One-segment keys are accepted, as Consul does; empty segments are not.
    config.set("nonamespace", "v").await.unwrap();
    let error = config.set("prod//x", "v").await.unwrap_err();
    assert!(error.to_string().contains("segment"), "{error}");
    assert!(config.get_as::<u32>("staging/orders/max_conn").unwrap() == Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_key_converge_to_one_value() {
    let nodes = cluster(5).await;
    let writes = nodes.iter().enumerate().map(|(i, node)| {
        let config = node.config();
        async move {
            config
                .set_str("prod/feature/flag", &format!("from-{i}"))
                .await
        }
    });
    for result in futures_util::future::join_all(writes).await {
        result.unwrap();
    }
    eventually(&nodes[0], "some value", |n| {
        value(n, "prod/feature/flag").is_some()
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let values: Vec<_> = nodes
            .iter()
            .map(|n| value(n, "prod/feature/flag"))
            .collect();
        if values.iter().all(|v| v == &values[0]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "diverged: {values:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_with_writes_on_both_sides_heals_to_one_state() {
    let faults = Faults::new();
    let nodes = cluster_of(
        (0..6).map(|i| builder(&format!("node-{i}"), &[])).collect(),
        Some(&faults),
    )
    .await;
    let left: Vec<_> = nodes[..3].iter().map(|n| n.addr()).collect();
    let right: Vec<_> = nodes[3..].iter().map(|n| n.addr()).collect();
    faults.partition(&left, &right);
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[0].config().set_str("prod/a/left", "L").await.unwrap();
    nodes[0]
        .config()
        .set_str("prod/a/both", "left-side")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    nodes[4]
        .config()
        .set_str("prod/a/right", "R")
        .await
        .unwrap();
    nodes[4]
        .config()
        .set_str("prod/a/both", "right-side")
        .await
        .unwrap();
    for node in &nodes[..3] {
        eventually(node, "left writes", |n| value(n, "prod/a/left").is_some()).await;
        assert!(value(node, "prod/a/right").is_none());
    }
    faults.heal();
    for node in &nodes {
        alive(node, 6).await;
        eventually(node, "healed", |n| {
            value(n, "prod/a/left").is_some() && value(n, "prod/a/right").is_some()
        })
        .await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let states: Vec<_> = nodes.iter().map(|n| n.config().list("")).collect();
        if states.iter().all(|s| s == &states[0]) {
            // The later write (made on the right side) wins on both sides.
            assert_eq!(
                value(&nodes[0], "prod/a/both").as_deref(),
                Some("right-side")
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "diverged: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_every_change_of_its_prefix_in_order() {
    let nodes = cluster(3).await;
    let writer = nodes[2].config();
    let mut local = writer.watch_prefix("prod/orders");
    let mut watch = nodes[0].config().watch_prefix("prod/orders");
    for i in 0..20 {
        writer
            .set_str("prod/orders/max_conn", &i.to_string())
            .await
            .unwrap();
        writer.set_str("prod/payments/x", "ignored").await.unwrap();
    }
    writer.delete("prod/orders/max_conn").await.unwrap();
    let final_change = |value: &Option<u32>| value.is_none();
    // On the writer's node every change was applied, so its watcher sees all of them.
    let seen = changes_until(&mut local, final_change).await;
    let expected: Vec<Option<u32>> = (0..20).map(Some).chain([None]).collect();
    assert_eq!(seen, expected, "every change, in order, the delete last");
    // Another node applies what reaches it: a value superseded before it arrived is never
    // applied there (last writer wins), so its watcher sees a subsequence of the writer's
    // changes, in the writer's order, that always ends with the latest (the delete).
    let remote = changes_until(&mut watch, final_change).await;
    let values: Vec<u32> = remote[..remote.len() - 1]
        .iter()
        .map(|v| v.unwrap())
        .collect();
    assert!(
        values.windows(2).all(|pair| pair[0] < pair[1]),
        "in the writer's order, nothing twice: {remote:?}"
    );

    // Resume from a returned version: only later changes.
    let resume_at = watch.seq();
    writer.set_str("prod/orders/timeout", "30s").await.unwrap();
    let mut resumed = nodes[0]
        .config()
        .watch_prefix_from("prod/orders", resume_at);
    match tokio::time::timeout(WAIT, resumed.next())
        .await
        .unwrap()
        .unwrap()
    {
        ConfigEvent::Changed(change) => assert_eq!(change.key, "prod/orders/timeout"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_the_compacted_history_gets_a_snapshot() {
    let node = builder("solo", &[])
        .config_history(8)
        .start()
        .await
        .unwrap();
    let config = node.config();
    config.set_str("prod/a/x", "1").await.unwrap();
    let start = config.current_seq();
    for i in 0..30 {
        config.set_str(&format!("prod/a/k{i}"), "v").await.unwrap();
    }
    let mut watch = config.watch_prefix_from("prod/a", start);
    match tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
    {
        ConfigEvent::Snapshot { seq, entries } => {
            assert_eq!(entries.len(), 31);
            assert_eq!(seq, config.current_seq());
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    config.set_str("prod/a/after", "v").await.unwrap();
    match tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
    {
        ConfigEvent::Changed(change) => assert_eq!(change.key, "prod/a/after"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_writer_loses_none_of_its_keys() {
    let nodes = cluster(4).await;
    for i in 0..50 {
        nodes[3]
            .config()
            .set_str(&format!("prod/svc/key{i}"), "v")
            .await
            .unwrap();
    }
    for node in &nodes[..3] {
        eventually(node, "50 keys", |n| n.config().list("prod/svc").len() == 50).await;
    }
    nodes[3].shutdown().await;
    for node in &nodes[..3] {
        tokio::time::timeout(
            WAIT,
            node.wait_for_members(|m| {
                m.iter()
                    .any(|m| m.name == "node-3" && m.status == MemberStatus::Down)
            }),
        )
        .await
        .unwrap();
        assert_eq!(node.config().list("prod/svc").len(), 50);
    }
    // A newcomer gets them from the survivors.
    let late = builder("late", &[nodes[1].addr()]).start().await.unwrap();
    eventually(&late, "50 keys", |n| {
        n.config().list("prod/svc").len() == 50
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_never_let_an_older_write_win() {
    // node-0 runs 10 s ahead, node-1 runs 10 s behind.
    let system = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let nodes = cluster_of(
        vec![
            builder("node-0", &[]).wall_clock(move || system() + 10_000),
            builder("node-1", &[]).wall_clock(move || system() - 10_000),
            builder("node-2", &[]),
        ],
        None,
    )
    .await;
    nodes[0]
        .config()
        .set_str("prod/app/mode", "fast-clock")
        .await
        .unwrap();
    eventually(&nodes[1], "observed", |n| {
        value(n, "prod/app/mode").as_deref() == Some("fast-clock")
    })
    .await;
    // Written after observing the other write: it must win although its clock is 20 s behind.
    nodes[1]
        .config()
        .set_str("prod/app/mode", "slow-clock")
        .await
        .unwrap();
    for node in &nodes {
        eventually(node, "the later write wins", |n| {
            value(n, "prod/app/mode").as_deref() == Some("slow-clock")
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        assert_eq!(value(node, "prod/app/mode").as_deref(), Some("slow-clock"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_tombstones_do_not_resurrect_deleted_keys() {
    let horizon = Duration::from_secs(2);
    let nodes = cluster_of(
        (0..3)
            .map(|i| builder(&format!("node-{i}"), &[]).config_tombstone_horizon(horizon))
            .collect(),
        None,
    )
    .await;
    nodes[0]
        .config()
        .set_str("prod/x/gone", "old")
        .await
        .unwrap();
    nodes[0].config().set_str("prod/x/kept", "v").await.unwrap();
    for node in &nodes {
        eventually(node, "written", |n| n.config().list("prod/x").len() == 2).await;
    }
    nodes[1].config().delete("prod/x/gone").await.unwrap();
    for node in &nodes {
        eventually(node, "deleted", |n| value(n, "prod/x/gone").is_none()).await;
    }
    // Past the horizon every node has collected the tombstone; anti-entropy keeps running.
    tokio::time::sleep(horizon * 3).await;
    let late = builder("late", &[nodes[0].addr()])
        .config_tombstone_horizon(horizon)
        .start()
        .await
        .unwrap();
    eventually(&late, "kept key", |n| value(n, "prod/x/kept").is_some()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in nodes.iter().chain([&late]) {
        assert_eq!(
            value(node, "prod/x/gone"),
            None,
            "{} resurrected it",
            node.identity()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_reach_a_fresh_node() {
    let nodes = cluster(2).await;
    let config = nodes[0].config();
    for i in 0..10_000 {
        config
            .set_str(&format!("prod/bulk/key{i:05}"), "value-of-moderate-size")
            .await
            .unwrap();
    }
    eventually(&nodes[1], "10k keys", |n| {
        n.config().list("prod/bulk").len() == 10_000
    })
    .await;
    let fresh = builder("fresh", &[nodes[1].addr()]).start().await.unwrap();
    eventually(&fresh, "10k keys", |n| {
        n.config().list("prod/bulk").len() == 10_000
    })
    .await;
}

/// Values of the changes a watch yields (`None`: a delete) until `last` holds of one.
async fn changes_until(
    watch: &mut grapevine::ConfigWatch,
    last: impl Fn(&Option<u32>) -> bool,
) -> Vec<Option<u32>> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("the watch yields within the wait")
            .expect("the watch stays open")
        {
            ConfigEvent::Changed(change) => {
                assert!(change.key.starts_with("prod/orders/"), "{change:?}");
                let value = change
                    .value
                    .map(|v| String::from_utf8(v).unwrap().parse().unwrap());
                let done = last(&value);
                seen.push(value);
                if done {
                    return seen;
                }
            }
            ConfigEvent::Snapshot { .. } => panic!("no compaction expected"),
        }
    }
}
