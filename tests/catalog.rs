//! The service catalog across in-process clusters on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use grapevine::net::faulty::{Faults, FaultyTransport};
use grapevine::net::TokioTransport;
use grapevine::{Check, Health, MemberStatus, Node, Profile, Query, Service};

mod common;

use common::{cluster, eventually, start, summary, WAIT};

fn web(id: &str, port: u16) -> Service {
    Service::new("web", id, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_deregistration_reach_every_node_of_ten() {
    let nodes = cluster(10).await;
    let mut service = web("web-3", 8080);
    service.tags = vec!["v2".into()];
    service.meta.insert("zone".into(), "a".into());
    nodes[3].register(service).await.unwrap();
    for node in &nodes {
        eventually(node, "web-3 visible", |n| {
            let found = n.catalog().lookup("web");
            found.len() == 1
                && found[0].node == "node-3"
                && found[0].port == 8080
                && found[0].addr == nodes[3].addr().ip()
                && found[0].meta["zone"] == "a"
        })
        .await;
        assert_eq!(
            node.catalog()
                .lookup_with("web", &Query::default().tag("v2"))
                .len(),
            1
        );
        assert!(node
            .catalog()
            .lookup_with("web", &Query::default().tag("v1"))
            .is_empty());
    }
    nodes[3].deregister("web-3").await.unwrap();
    for node in &nodes {
        eventually(node, "web-3 gone", |n| n.catalog().lookup("web").is_empty()).await;
        assert!(node.catalog().services().is_empty());
    }
    assert!(
        nodes[3].deregister("web-3").await.is_err(),
        "unknown id is an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_nodes_instances_leave_every_lookup() {
    let nodes = cluster(5).await;
    for (i, node) in nodes.iter().enumerate() {
        node.register(web(&format!("web-{i}"), 8000 + i as u16))
            .await
            .unwrap();
    }
    for node in &nodes {
        eventually(node, "5 instances", |n| {
            n.catalog().lookup("web").len() == 5
        })
        .await;
    }
    nodes[4].shutdown().await;
    for node in &nodes[..4] {
        eventually(node, "crashed instance gone", |n| {
            let found = n.catalog().lookup("web");
            found.len() == 4 && found.iter().all(|i| i.node != "node-4")
        })
        .await;
        // Still listed for operators, marked with its node's status.
        let listed = node.catalog().all_instances();
        assert!(listed
            .iter()
            .any(|i| i.node == "node-4" && i.node_status == MemberStatus::Down));
        assert_eq!(node.catalog().services()["web"].instances, 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_gets_the_full_catalog() {
    let nodes = cluster(4).await;
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..5 {
            let mut service = Service::new(format!("svc-{j}"), format!("svc-{j}-{i}"), 9000 + j);
            service.meta.insert("owner".into(), format!("node-{i}"));
            node.register(service).await.unwrap();
        }
    }
    for node in &nodes {
        eventually(node, "20 instances", |n| {
            n.catalog().all_instances().len() == 20
        })
        .await;
    }
    // No new change happens after the late node joins: anti-entropy alone must bring it.
    let late = start("late", &[nodes[2].addr()]).await;
    eventually(&late, "full catalog", |n| {
        n.catalog().all_instances().len() == 20
    })
    .await;
    assert_eq!(
        summary(&late.catalog().all_instances()),
        summary(&nodes[0].catalog().all_instances())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal_converges_to_one_catalog() {
    let faults = Faults::new();
    let mut nodes = Vec::new();
    for i in 0..6 {
        let seeds: Vec<SocketAddr> = nodes
            .first()
            .map(|n: &Node| vec![n.addr()])
            .unwrap_or_default();
        let node = Node::builder(format!("node-{i}"))
            .seeds(seeds)
            .profile(Profile::Local)
            .start_on(FaultyTransport::new(TokioTransport, faults.clone()))
            .await
            .unwrap();
        nodes.push(node);
    }
    for node in &nodes {
        common::alive(node, 6).await;
    }
    let left: Vec<SocketAddr> = nodes[..3].iter().map(|n| n.addr()).collect();
    let right: Vec<SocketAddr> = nodes[3..].iter().map(|n| n.addr()).collect();
    faults.partition(&left, &right);
    // Let exchanges that were under way when the links were cut finish first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both sides change the catalog while cut off from each other.
    nodes[0].register(web("web-left", 8001)).await.unwrap();
    nodes[4].register(web("web-right", 8002)).await.unwrap();
    nodes[5]
        .register(Service::new("db", "db-right", 5432))
        .await
        .unwrap();
    for node in &nodes[..3] {
        eventually(node, "left change", |n| {
            n.catalog().lookup("web").len() == 1
        })
        .await;
    }
    for node in &nodes[3..] {
        eventually(node, "right changes", |n| {
            n.catalog()
                .lookup("web")
                .iter()
                .any(|i| i.id == "web-right")
                && n.catalog().lookup("db").len() == 1
        })
        .await;
        assert!(!node
            .catalog()
            .all_instances()
            .iter()
            .any(|i| i.id == "web-left"));
    }
    faults.heal();
    for node in &nodes {
        common::alive(node, 6).await;
        eventually(node, "healed catalog", |n| {
            n.catalog().lookup("web").len() == 2 && n.catalog().lookup("db").len() == 1
        })
        .await;
    }
    let reference = summary(&nodes[0].catalog().all_instances());
    for node in &nodes {
        assert_eq!(summary(&node.catalog().all_instances()), reference);
    }
    let _ = Arc::strong_count(&faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_propagate() {
    let nodes = cluster(4).await;
    let handle = nodes[1]
        .register_with_check(web("web-ttl", 8080), Check::ttl(Duration::from_millis(800)))
        .await
        .unwrap();
    // TTL checks start critical, as in Consul.
    for node in &nodes {
        eventually(node, "critical first", |n| {
            let all = n
                .catalog()
                .lookup_with("web", &Query::default().include_unhealthy());
            all.len() == 1 && all[0].health == Health::Critical
        })
        .await;
        assert!(node.catalog().lookup("web").is_empty());
    }
    handle.pass().await.unwrap();
    for node in &nodes {
        eventually(node, "passing", |n| n.catalog().lookup("web").len() == 1).await;
    }
    // No report within the TTL: critical everywhere.
    for node in &nodes {
        eventually(node, "expired", |n| n.catalog().lookup("web").is_empty()).await;
    }
    handle.warn().await.unwrap();
    for node in &nodes {
        eventually(node, "warning", |n| {
            n.catalog()
                .lookup_with("web", &Query::default().include_unhealthy())
                .first()
                .map(|i| i.health)
                == Some(Health::Warning)
        })
        .await;
    }

    // A TCP check follows a listener's life.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    nodes[2]
        .register_with_check(
            Service::new("api", "api-1", port),
            Check::tcp(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    for node in &nodes {
        eventually(node, "api passing", |n| {
            n.catalog().lookup("api").len() == 1
        })
        .await;
    }
    drop(listener);
    for node in &nodes {
        eventually(node, "api critical", |n| {
            n.catalog().lookup("api").is_empty()
        })
        .await;
    }

    // A custom check.
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = healthy.clone();
    nodes[3]
        .register_with_check(
            Service::new("job", "job-1", 1),
            Check::custom(Duration::from_millis(200), move || {
                let ok = flag.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if ok {
                        Health::Passing
                    } else {
                        Health::Critical
                    }
                }
            }),
        )
        .await
        .unwrap();
    eventually(&nodes[0], "job passing", |n| {
        n.catalog().lookup("job").len() == 1
    })
    .await;
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(&nodes[0], "job critical", |n| {
        n.catalog().lookup("job").is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_fires_once_per_change_and_coalesces_bursts() {
    let nodes = cluster(3).await;
    let mut watch = nodes[0].catalog().watch("web");
    assert_eq!(
        watch.next().await,
        Some(vec![]),
        "the current set comes first"
    );

    nodes[1].register(web("web-1", 8001)).await.unwrap();
    let set = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(set.len(), 1);
    // Nothing else changed: no spurious wake-up.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), watch.next())
            .await
            .is_err()
    );

    // A burst of changes while nobody reads: one wake-up with the latest set.
    for i in 2..12 {
        nodes[2]
            .register(web(&format!("web-{i}"), 8000 + i))
            .await
            .unwrap();
    }
    eventually(&nodes[0], "burst applied", |n| {
        n.catalog().lookup("web").len() == 11
    })
    .await;
    let set = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(set.len(), 11);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err()
    );

    // Changes of other services do not wake a watcher of `web`.
    nodes[1]
        .register(Service::new("db", "db-1", 5432))
        .await
        .unwrap();
    eventually(&nodes[0], "db seen", |n| {
        n.catalog().lookup("db").len() == 1
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err()
    );

    nodes[2].shutdown().await;
    let set = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        set.len(),
        1,
        "the crashed node's ten instances leave at once: {set:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_services_with_a_kilobyte_of_meta_each_replicate() {
    let nodes = cluster(3).await;
    for i in 0..100 {
        let mut service = Service::new("bulk", format!("bulk-{i}"), 10_000 + i);
        service.meta.insert("blob".into(), "x".repeat(1024));
        nodes[0].register(service).await.unwrap();
    }
    for node in &nodes {
        eventually(node, "100 bulk instances", |n| {
            n.catalog().lookup("bulk").len() == 100
        })
        .await;
    }
    assert_eq!(
        nodes[2].catalog().lookup("bulk")[7].meta["blob"].len(),
        1024
    );

    // Beyond the limits: a clear error, nothing truncated.
    let mut huge = Service::new("bulk", "huge", 1);
    huge.meta.insert("blob".into(), "x".repeat(8 * 1024));
    let error = nodes[0].register(huge).await.unwrap_err();
    assert!(error.to_string().contains("meta"), "{error}");
    let error = nodes[0]
        .register(Service::new("bad name!", "x", 1))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("name"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_re_announces_its_own_records() {
    let nodes = cluster(3).await;
    let old = nodes[2].identity();
    nodes[2].register(web("web-a", 8001)).await.unwrap();
    nodes[2].register(web("web-b", 8002)).await.unwrap();
    eventually(&nodes[0], "two instances", |n| {
        n.catalog().lookup("web").len() == 2
    })
    .await;
    nodes[2].shutdown().await;
    eventually(&nodes[0], "gone", |n| n.catalog().lookup("web").is_empty()).await;

    let back = Node::builder(old.name.clone())
        .bind(old.addr)
        .seeds([nodes[0].addr()])
        .profile(Profile::Local)
        .start()
        .await
        .unwrap();
    back.register(web("web-a", 8001)).await.unwrap();
    for node in [&nodes[0], &nodes[1], &back] {
        eventually(node, "only the new incarnation's record", |n| {
            let found = n.catalog().lookup("web");
            found.len() == 1 && found[0].id == "web-a"
        })
        .await;
    }
    // The old incarnation's web-b never comes back, even after several sync rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids: BTreeMap<_, _> = nodes[1]
        .catalog()
        .all_instances()
        .into_iter()
        .map(|i| (i.id, i.node))
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
}
