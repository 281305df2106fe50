//! Hostile input against a running node: junk datagrams and junk TCP streams are dropped
//! and counted, and the cluster keeps working.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{alive, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_datagrams_are_dropped_and_counted() {
    let a = start("a", &[]).await;
    let b = start("b", &[a.addr()]).await;
    alive(&a, 2).await;

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    let mut sent = 0u64;
    for round in 0..3_000u32 {
        let datagram: Vec<u8> = match round % 4 {
            // Pure noise.
            0 => (0..rng.random_range(1..1400))
                .map(|_| rng.random())
                .collect(),
            // A valid envelope around noise: reaches foca's decoder.
            1 => {
                let mut d = vec![0x47, 3, 0];
                d.extend((0..rng.random_range(0..200)).map(|_| rng.random::<u8>()));
                d
            }
            // Oversized.
            2 => vec![0x47; 4000],
            // Truncated envelope and a leave notice for nobody.
            _ => vec![0x47, 3, 1, 0xff],
        };
        socket.send_to(&datagram, a.addr()).await.unwrap();
        sent += 1;
        if round % 50 == 0 {
            // Pace the flood so the kernel's socket buffer, not the node, is not the limit.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Let the node drain its socket, then check the books.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = a.stats();
    assert!(stats.udp_dropped > sent / 2, "{stats:?}");
    // Everything received was junk but the few packets of the live peer.
    assert!(stats.udp_dropped + 100 >= stats.udp_received, "{stats:?}");

    // Membership is intact and a newcomer still joins.
    let c = start("c", &[a.addr()]).await;
    for node in [&a, &b, &c] {
        alive(node, 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_tcp_port_closes_only_that_connection() {
    let a = start("a", &[]).await;
    let b = start("b", &[a.addr()]).await;
    alive(&a, 2).await;

    let mut rng = SmallRng::seed_from_u64(2);
    // A client that sends half a frame and stalls must not block the others.
    let mut stalled = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
    stalled.write_all(&[0, 0, 0, 100, 1, 2]).await.unwrap();
    for i in 0..30 {
        let mut stream = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
        let junk: Vec<u8> = match i % 3 {
            0 => (0..rng.random_range(1..4096))
                .map(|_| rng.random())
                .collect(),
            // Length prefix far above the frame limit.
            1 => vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            // A well-framed message that is not a request.
            _ => {
                let mut d = vec![0, 0, 0, 8];
                d.extend([0xEE; 8]);
                d
            }
        };
        let _ = stream.write_all(&junk).await;
        let _ = stream.shutdown().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.stats().tcp_dropped >= 20, "{:?}", a.stats());

    let members = grapevine::node::control::members(a.addr())
        .await
        .expect("control still served");
    assert_eq!(members.len(), 2);
    let c = start("c", &[a.addr()]).await;
    for node in [&a, &b, &c] {
        alive(node, 3).await;
    }
    drop(stalled);
}

/// Whether the node closed `stream` within `within` (it read nothing, or failed).
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An answer (a refusal) may come before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_hello_gets_no_large_frame_buffered() {
    let a = start("a", &[]).await;
    let b = start("b", &[a.addr()]).await;
    alive(&a, 2).await;
    let before = a.stats();
    // Well under the node's 5 s TCP timeout: "closed at once", not "timed out".
    let prompt = Duration::from_secs(2);

    // Each declares a frame just under 8 MiB and sends 32 KiB of it, without a hello.
    let mut declared = (8u32 << 20) - 1;
    let mut refused = 0;
    let mut rng = SmallRng::seed_from_u64(3);
    for i in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
        let mut bytes = match i % 4 {
            // Large frames of every size above the unproven limit.
            0 | 1 => declared.to_be_bytes().to_vec(),
            // Random bytes.
            2 => (0..4096).map(|_| rng.random()).collect(),
            // A small, well-framed request that is not a hello.
            _ => frame(&[0u8; 8]),
        };
        declared = declared / 2 + 1024;
        bytes.extend(vec![7u8; 32 * 1024]);
        let _ = stream.write_all(&bytes).await;
        assert!(
            closed_within(&mut stream, prompt).await,
            "connection {i} kept"
        );
        refused += 1;
    }
    let stats = a.stats();
    assert!(
        stats.tcp_refused_hello - before.tcp_refused_hello >= refused,
        "{stats:?}"
    );
    assert_eq!(stats.tcp_refused_budget, before.tcp_refused_budget);

    // The same large frame after a hello is taken (and held until the frame completes):
    // it was the missing hello that closed the others.
    let mut proven = tokio::net::TcpStream::connect(a.addr()).await.unwrap();
    let mut bytes = frame(&grapevine::wire::hello_frame());
    bytes.extend_from_slice(&((8u32 << 20) - 1).to_be_bytes());
    bytes.extend(vec![7u8; 32 * 1024]);
    proven.write_all(&bytes).await.unwrap();
    assert!(!closed_within(&mut proven, Duration::from_millis(700)).await);
    assert_eq!(a.stats().tcp_refused_hello, stats.tcp_refused_hello);
    drop(proven);

    // A big first exchange from a real client still works: a config value near the limit,
    // written through the control protocol and replicated to b over anti-entropy.
    let value = vec![b'v'; grapevine::state::config::MAX_VALUE_LEN - 16];
    let written = grapevine::node::control::control_request(
        a.addr(),
        grapevine::node::control::ControlRequest::ConfigSet {
            key: "big/value".into(),
            value: value.clone(),
        },
        grapevine::node::control::CONTROL_TIMEOUT,
    )
    .await
    .expect("control served");
    assert!(
        matches!(
            written,
            grapevine::node::control::ControlResponse::ConfigWritten { .. }
        ),
        "{written:?}"
    );
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while b.config().get("big/value").map(|v| v.len()) != Some(value.len()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never got the value"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
