//! Hostile input against a running node: junk datagrams and junk TCP streams are dropped
//! and counted, and the cluster keeps working.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::io::AsyncWriteExt;

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
                let mut d = vec![0x47, 2, 0];
                d.extend((0..rng.random_range(0..200)).map(|_| rng.random::<u8>()));
                d
            }
            // Oversized.
            2 => vec![0x47; 4000],
            // Truncated envelope and a leave notice for nobody.
            _ => vec![0x47, 2, 1, 0xff],
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
