//! Encrypted clusters: who gets in, what is refused, and live key rotation.

use std::net::SocketAddr;
use std::time::Duration;

use grapevine::net::sealed::{Key, Keyring};
use grapevine::node::control::{self, ControlRequest, ControlResponse, KeyOp};
use grapevine::{MemberEvent, MemberStatus, NodeBuilder, RpcService, Service};

mod common;

use common::{alive, WAIT};

fn node(name: &str, key: Option<&Key>, seeds: &[SocketAddr]) -> NodeBuilder {
    let builder = common::builder(name, seeds);
    match key {
        Some(key) => builder.keyring(Keyring::new(key.clone())),
        None => builder,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_same_key_form_a_working_cluster() {
    let key = Key::generate().unwrap();
    let a = node("a", Some(&key), &[]).start().await.unwrap();
    let b = node("b", Some(&key), &[a.addr()]).start().await.unwrap();
    let c = node("c", Some(&key), &[a.addr()]).start().await.unwrap();
    for n in [&a, &b, &c] {
        alive(n, 3).await;
    }
    // Catalog, config and RPC all travel sealed.
    b.register(Service::new("web", "web-1", 80)).await.unwrap();
    c.config().set_str("prod/x/y", "z").await.unwrap();
    b.serve(RpcService::new("echo").method("echo", |s: String| async move { Ok(s) }))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.catalog().lookup("web").is_empty()
        || a.config().get_str("prod/x/y").unwrap().is_none()
        || a.catalog().lookup("echo").is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "state did not spread"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let echoed: String = a
        .client("echo")
        .call("echo", &"sealed".to_string())
        .await
        .unwrap();
    assert_eq!(echoed, "sealed");
    assert_eq!(a.stats().sealed_refused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_no_key_or_another_label_is_refused() {
    let key = Key::generate().unwrap();
    let seed = node("seed", Some(&key), &[]).start().await.unwrap();
    let wrong = node("wrong", Some(&Key::generate().unwrap()), &[seed.addr()])
        .start()
        .await
        .unwrap();
    let plain = node("plain", None, &[seed.addr()]).start().await.unwrap();
    let other_label = node("label", Some(&key), &[seed.addr()])
        .cluster_label("another-cluster")
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for outsider in [&wrong, &plain, &other_label] {
        assert_eq!(
            outsider.members().len(),
            1,
            "{} got in",
            outsider.identity()
        );
    }
    assert_eq!(seed.members().len(), 1, "{:?}", seed.members());
    assert!(seed.stats().sealed_refused > 0);
    // The plaintext node was told why, and counted the sealed datagrams it could not read.
    assert!(plain.stats().udp_dropped > 0 || plain.stats().sync_failed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_datagrams_are_rejected_when_encryption_is_on() {
    let key = Key::generate().unwrap();
    let a = node("a", Some(&key), &[]).start().await.unwrap();
    let b = node("b", Some(&key), &[a.addr()]).start().await.unwrap();
    alive(&a, 2).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A plaintext grapevine leave notice for b, and junk: neither may do anything.
    let mut forged_leave = vec![0x47, 3, 1];
    forged_leave.extend_from_slice(&[1, b'b', 0, 0, 0, 0, 0, 0, 0]);
    for _ in 0..50 {
        socket.send_to(&forged_leave, a.addr()).await.unwrap();
        socket.send_to(b"hello", a.addr()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.stats().sealed_refused >= 100, "{:?}", a.stats());
    assert!(a.members().iter().all(|m| m.status == MemberStatus::Alive));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rotation_across_five_nodes_loses_no_member() {
    let old = Key::generate().unwrap();
    let new = Key::generate().unwrap();
    let first = node("n0", Some(&old), &[]).start().await.unwrap();
    let mut nodes = vec![first];
    for i in 1..5 {
        let seeds = [nodes[0].addr()];
        nodes.push(
            node(&format!("n{i}"), Some(&old), &seeds)
                .start()
                .await
                .unwrap(),
        );
    }
    for n in &nodes {
        alive(n, 5).await;
    }
    let mut watchers: Vec<_> = nodes.iter().map(|n| n.events()).collect();
    let agent = nodes[2].addr();
    let rotate = |op: KeyOp| async move {
        match control::control_request(
            agent,
            ControlRequest::Keys { op, cluster: true },
            control::CONTROL_TIMEOUT,
        )
        .await
        .unwrap()
        {
            ControlResponse::Keys(report) => report,
            other => panic!("{other:?}"),
        }
    };
    let report = rotate(KeyOp::Install(new.to_base64())).await;
    assert_eq!(
        (report.applied.len(), report.failed.len()),
        (5, 0),
        "{report:?}"
    );
    let report = rotate(KeyOp::Use(new.to_base64())).await;
    assert_eq!(
        (report.applied.len(), report.failed.len()),
        (5, 0),
        "{report:?}"
    );
    // Removing a primary key is refused.
    let report = rotate(KeyOp::Remove(new.to_base64())).await;
    assert_eq!(report.applied.len(), 0);
    assert!(report.failed[0].1.contains("primary"), "{report:?}");
    let report = rotate(KeyOp::Remove(old.to_base64())).await;
    assert_eq!(
        (report.applied.len(), report.failed.len()),
        (5, 0),
        "{report:?}"
    );
    for n in &nodes {
        assert_eq!(n.keys().unwrap().keys(), std::slice::from_ref(&new));
    }
    // Several probe rounds on the new key: still everyone alive, and nobody was ever down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in &nodes {
        alive(n, 5).await;
    }
    for events in &mut watchers {
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(20), events.next()).await
        {
            assert!(
                !matches!(event, MemberEvent::Down(_) | MemberEvent::Left(_)),
                "rotation cost a member: {event:?}"
            );
        }
    }
    // The old key no longer gets in; the new one does.
    let stale = node("stale", Some(&old), &[nodes[0].addr()])
        .start()
        .await
        .unwrap();
    let fresh = node("fresh", Some(&new), &[nodes[0].addr()])
        .start()
        .await
        .unwrap();
    alive(&fresh, 6).await;
    assert_eq!(stale.members().len(), 1);
}
