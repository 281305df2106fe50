//! In-process clusters on loopback: convergence, failure detection, leave, restart, late seed.

use std::time::Duration;

use grapevine::{Member, MemberEvent, MemberStatus, Node, Profile};

mod common;

use common::{cluster, start, WAIT};

fn count(members: &[Member], status: MemberStatus) -> usize {
    members.iter().filter(|m| m.status == status).count()
}

fn status_of(members: &[Member], name: &str) -> Option<MemberStatus> {
    members.iter().find(|m| m.name == name).map(|m| m.status)
}

async fn wait_until(node: &Node, condition: impl FnMut(&[Member]) -> bool) {
    if tokio::time::timeout(WAIT, node.wait_for_members(condition))
        .await
        .is_err()
    {
        panic!(
            "{} did not get there: {:?}",
            node.identity(),
            node.members()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge() {
    let nodes = cluster(5).await;
    for node in &nodes {
        let members = node.members();
        assert_eq!(members.len(), 5);
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["node-0", "node-1", "node-2", "node-3", "node-4"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_node_is_marked_down_by_every_other_node() {
    let nodes = cluster(5).await;
    let victim = nodes[3].identity();
    nodes[3].shutdown().await;
    for (i, node) in nodes.iter().enumerate() {
        if i != 3 {
            wait_until(node, |m| {
                status_of(m, &victim.name) == Some(MemberStatus::Down)
            })
            .await;
            assert_eq!(count(&node.members(), MemberStatus::Alive), 4);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_is_seen_as_left_never_down() {
    let nodes = cluster(4).await;
    let mut watchers: Vec<_> = nodes[..3].iter().map(|n| n.events()).collect();
    let leaver = nodes[3].identity().name;
    nodes[3].leave().await.expect("leave");
    for node in &nodes[..3] {
        wait_until(node, |m| status_of(m, &leaver) == Some(MemberStatus::Left)).await;
    }
    // Give any late failure detection the time it would need to fire.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (node, events) in nodes[..3].iter().zip(watchers.iter_mut()) {
        assert_eq!(
            status_of(&node.members(), &leaver),
            Some(MemberStatus::Left)
        );
        let mut seen_left = false;
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(50), events.next()).await
        {
            if event.member().name == leaver {
                assert!(
                    !matches!(event, MemberEvent::Down(_)),
                    "leave reported as failure: {event:?}"
                );
                seen_left |= matches!(event, MemberEvent::Left(_));
            }
        }
        assert!(seen_left, "{} saw no Left event", node.identity());
    }
    assert!(
        nodes[3].leave().await.is_err(),
        "a stopped node cannot leave twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_rejoins_and_old_generation_stays_dead() {
    let mut nodes = cluster(4).await;
    let old = nodes[2].identity();
    let crashed = nodes.remove(2);
    crashed.shutdown().await;
    drop(crashed);
    for node in &nodes {
        wait_until(node, |m| {
            status_of(m, &old.name) == Some(MemberStatus::Down)
        })
        .await;
    }
    let restarted = Node::builder(old.name.clone())
        .bind(old.addr)
        .seeds([nodes[0].addr()])
        .profile(Profile::Local)
        .start()
        .await
        .expect("restart on the same address");
    let new = restarted.identity();
    assert!(new.generation > old.generation);
    for node in nodes.iter().chain([&restarted]) {
        wait_until(node, |m| {
            m.iter().any(|m| {
                m.name == old.name
                    && m.status == MemberStatus::Alive
                    && m.generation == new.generation
            }) && count(m, MemberStatus::Alive) == 4
        })
        .await;
    }
    // Several push-pull rounds later, nobody has brought the old generation back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for node in nodes.iter().chain([&restarted]) {
        let me = node.members();
        let entry = me.iter().find(|m| m.name == old.name).expect("listed");
        assert_eq!(
            (entry.generation, entry.status),
            (new.generation, MemberStatus::Alive)
        );
        assert_eq!(count(&me, MemberStatus::Alive), 4, "{me:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_before_its_seed_joins_once_the_seed_is_up() {
    // Reserve a port for the seed, then free it so the seed can start there later.
    let probe = Node::builder("probe").start().await.expect("probe");
    let seed_addr = probe.addr();
    probe.shutdown().await;
    drop(probe);

    let early = start("early", &[seed_addr]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(early.members().len(), 1, "nobody to join yet");

    let seed = Node::builder("seed")
        .bind(seed_addr)
        .profile(Profile::Local)
        .start()
        .await
        .expect("seed starts on the reserved port");
    for node in [&early, &seed] {
        wait_until(node, |m| count(m, MemberStatus::Alive) == 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_report_join_suspect_and_down() {
    let nodes = cluster(3).await;
    let mut events = nodes[0].events();
    let late = start("late", &[nodes[1].addr()]).await;
    let victim = late.identity().name;
    let mut saw = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !saw.contains(&"down") {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("events in time")
            .expect("stream open");
        if event.member().name != victim {
            continue;
        }
        match event {
            MemberEvent::Joined(_) => {
                saw.push("joined");
                late.shutdown().await;
            }
            MemberEvent::Suspect(_) => saw.push("suspect"),
            MemberEvent::Down(_) => saw.push("down"),
            MemberEvent::Left(_) => panic!("a crash is not a leave"),
            MemberEvent::Updated(_) => {}
        }
    }
    assert_eq!(saw.first(), Some(&"joined"));
    assert_eq!(saw.last(), Some(&"down"));
}

#[tokio::test]
async fn invalid_configuration_is_refused_with_a_clear_error() {
    let error = Node::builder("bad name!").start().await.unwrap_err();
    assert!(error.to_string().contains("node name"), "{error}");
    let error = Node::builder("n")
        .bind("0.0.0.0:0".parse().unwrap())
        .start()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("advertise"), "{error}");
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let error = Node::builder("n")
        .bind(taken.local_addr().unwrap())
        .start()
        .await
        .unwrap_err();
    assert!(error.to_string().starts_with("cannot bind"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_converged_cluster_skips_member_lists_in_periodic_push_pulls() {
    let nodes = cluster(3).await;
    // Local profile: a periodic push-pull every 3 s per node, first after 0-3 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let skipped: u64 = nodes.iter().map(|n| n.stats().push_pull_skipped).sum();
        if skipped >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no periodic push-pull found the views equal: {:?}",
            nodes.iter().map(|n| n.stats()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for node in &nodes {
        assert_eq!(count(&node.members(), MemberStatus::Alive), 3);
    }
}
