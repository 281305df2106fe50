//! Seeds given by host name, on loopback: `localhost:PORT` joins, a seed that appears later
//! is found by re-resolving, a name that does not resolve is retried without stopping the
//! node, and the agent refuses a malformed `--join` with a one-line error.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use grapevine::node::SeedName;
use grapevine::{Member, MemberStatus, Node, Profile};

mod common;

use common::alive as wait_alive;

fn alive(members: &[Member]) -> usize {
    members
        .iter()
        .filter(|m| m.status == MemberStatus::Alive)
        .count()
}

fn name(text: &str) -> SeedName {
    text.parse().expect("a valid seed name")
}

/// A port free on 127.0.0.1 for both UDP and TCP right now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_localhost_by_name() {
    let seed = Node::builder("seed")
        .profile(Profile::Local)
        .start()
        .await
        .unwrap();
    let joiner = Node::builder("joiner")
        .profile(Profile::Local)
        .seed_names([name(&format!("localhost:{}", seed.addr().port()))])
        .start()
        .await
        .unwrap();
    wait_alive(&joiner, 2).await;
    wait_alive(&seed, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_seed_started_later_is_found_by_resolving_again() {
    let port = free_port();
    let joiner = Node::builder("early")
        .profile(Profile::Local)
        .seed_names([name(&format!("localhost:{port}"))])
        .start()
        .await
        .unwrap();
    // Several join retries find nobody.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alive(&joiner.members()), 1);
    let seed = Node::builder("late-seed")
        .profile(Profile::Local)
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .start()
        .await
        .unwrap();
    wait_alive(&joiner, 2).await;
    wait_alive(&seed, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_seed_name_is_retried_and_the_others_still_work() {
    let seed = Node::builder("seed")
        .profile(Profile::Local)
        .start()
        .await
        .unwrap();
    // A 64-byte label is longer than DNS allows: refused without asking any server.
    let unresolvable = name(&format!("{}.invalid:7946", "a".repeat(64)));
    let alone = Node::builder("alone")
        .profile(Profile::Local)
        .seed_names([unresolvable.clone()])
        .start()
        .await
        .expect("an unresolvable seed does not stop the node");
    let joiner = Node::builder("joiner")
        .profile(Profile::Local)
        .seeds([seed.addr()])
        .seed_names([unresolvable])
        .start()
        .await
        .unwrap();
    wait_alive(&joiner, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alive(&alone.members()), 1, "{:?}", alone.members());
}

#[test]
fn malformed_join_and_agent_addresses_are_one_line_errors() {
    for bad in ["bad host:7946", "seed-without-port", "seed:0"] {
        let output = Command::new(env!("CARGO_BIN_EXE_grapevine"))
            .args(["agent", "--name", "a", "--join", bad])
            .stdin(Stdio::null())
            .output()
            .expect("run grapevine");
        assert_eq!(output.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("is not HOST:PORT"), "{stderr}");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_grapevine"))
        .args(["members", "--agent", "no-port"])
        .stdin(Stdio::null())
        .output()
        .expect("run grapevine");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("\"no-port\" is not IP:PORT or HOST:PORT: no port"),
        "{stderr}"
    );
}
