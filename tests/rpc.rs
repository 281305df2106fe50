//! RPC between in-process nodes on loopback.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine::{AppError, LoadBalance, RpcError, RpcService};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{cluster, instances_visible, start, WAIT};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Add {
    a: u64,
    b: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sum {
    sum: u64,
    node: String,
}

fn adder(node: &str) -> RpcService {
    let node = node.to_string();
    RpcService::new("math")
        .method("add", move |req: Add| {
            let node = node.clone();
            async move {
                Ok(Sum {
                    sum: req.a + req.b,
                    node,
                })
            }
        })
        .method("fail", |code: u32| async move {
            Err::<(), _>(AppError::new(code, "refused on purpose"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_calls_complete_correctly() {
    let nodes = cluster(4).await;
    for node in &nodes[1..] {
        node.serve(adder(&node.identity().name)).await.unwrap();
    }
    instances_visible(&nodes[0], "math", 3).await;
    let client = nodes[0].client("math");
    let calls = (0..5_000u64).map(|i| {
        let client = client.clone();
        async move {
            (
                i,
                client
                    .call::<Add, Sum>("add", &Add { a: i, b: 2 * i })
                    .await,
            )
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut per_node = std::collections::BTreeMap::new();
    for (i, result) in results {
        let sum = result.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(sum.sum, 3 * i);
        *per_node.entry(sum.node).or_insert(0) += 1;
    }
    // Power of two choices spreads the load over every instance.
    assert_eq!(per_node.len(), 3, "{per_node:?}");

    // Application errors and unknown methods are typed.
    let error = client.call::<u32, ()>("fail", &7).await.unwrap_err();
    assert_eq!(
        error,
        RpcError::Remote(AppError::new(7, "refused on purpose"))
    );
    let error = client.call::<(), ()>("nope", &()).await.unwrap_err();
    assert!(matches!(error, RpcError::NotFound(_)), "{error:?}");
    // Round robin visits the instances in turn.
    let rr = nodes[0].client("math").policy(LoadBalance::RoundRobin);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        seen.insert(
            rr.call::<Add, Sum>("add", &Add { a: 1, b: 1 })
                .await
                .unwrap()
                .node,
        );
    }
    assert_eq!(seen.len(), 3);
    // Prefer local picks this node's own instance.
    let local = nodes[1].client("math").policy(LoadBalance::PreferLocal);
    for _ in 0..5 {
        assert_eq!(
            local
                .call::<Add, Sum>("add", &Add { a: 1, b: 1 })
                .await
                .unwrap()
                .node,
            "node-1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_service_with_no_instances_fail_at_once() {
    let nodes = cluster(2).await;
    let started = Instant::now();
    let error = nodes[0]
        .client("ghost")
        .call::<(), ()>("x", &())
        .await
        .unwrap_err();
    assert_eq!(error, RpcError::NoInstances("ghost".into()));
    assert!(started.elapsed() < Duration::from_millis(500));
    // Direct calls and the built-in methods.
    let pong: grapevine::node::rpc::Pong = nodes[0]
        .call_node(
            nodes[1].addr(),
            grapevine::rpc::BUILTIN_SERVICE,
            "ping",
            &(),
        )
        .await
        .unwrap();
    assert_eq!(pong.node, "node-1");
    let info: grapevine::node::rpc::AgentInfo = nodes[0]
        .call_node(
            nodes[1].addr(),
            grapevine::rpc::BUILTIN_SERVICE,
            "info",
            &(),
        )
        .await
        .unwrap();
    assert_eq!(info.members_alive, 2);
}

fn slow_service(node: &str, started: tokio::sync::mpsc::UnboundedSender<String>) -> RpcService {
    let node = node.to_string();
    RpcService::new("slow").method("work", move |millis: u64| {
        let node = node.clone();
        let started = started.clone();
        async move {
            let _ = started.send(node.clone());
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok(node)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_fails_calls_promptly_and_idempotent_calls_move_on() {
    let nodes = cluster(3).await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    nodes[1]
        .serve(slow_service("node-1", started_tx.clone()))
        .await
        .unwrap();
    nodes[2]
        .serve(slow_service("node-2", started_tx))
        .await
        .unwrap();
    instances_visible(&nodes[0], "slow", 2).await;

    // Not idempotent: the crash surfaces as a connection error, long before the deadline.
    let client = nodes[0].client("slow").timeout(Duration::from_secs(10));
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            let began = Instant::now();
            (
                client.call::<u64, String>("work", &3_000).await,
                began.elapsed(),
            )
        }
    });
    let victim = tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    let index = if victim == "node-1" { 1 } else { 2 };
    nodes[index].shutdown().await;
    let (result, took) = call.await.unwrap();
    assert!(
        matches!(result, Err(RpcError::Unavailable { .. })),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(2), "failed only after {took:?}");

    // Idempotent: the same crash is retried on the healthy instance. A fresh instance
    // replaces the crashed one; calls go on until one lands on it first, which is crashed.
    let survivor = 3 - index;
    let victim_name = format!("node-{index}-b");
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let replacement = start(&victim_name, &[nodes[0].addr()]).await;
    replacement
        .serve(slow_service(&victim_name, started_tx.clone()))
        .await
        .unwrap();
    nodes[survivor]
        .serve(slow_service(&format!("node-{survivor}"), started_tx))
        .await
        .unwrap();
    instances_visible(&nodes[0], "slow", 2).await;
    let idempotent = nodes[0]
        .client("slow")
        .idempotent(true)
        .timeout(Duration::from_secs(10));
    for _attempt in 0..20 {
        let call = tokio::spawn({
            let idempotent = idempotent.clone();
            async move { idempotent.call::<u64, String>("work", &300).await }
        });
        let first = tokio::time::timeout(WAIT, started.recv())
            .await
            .unwrap()
            .unwrap();
        if first == victim_name {
            replacement.shutdown().await;
            let answer = call
                .await
                .unwrap()
                .expect("retried on the healthy instance");
            assert_eq!(answer, format!("node-{survivor}"));
            // The retry announced itself too.
            assert_eq!(started.recv().await.unwrap(), format!("node-{survivor}"));
            return;
        }
        assert_eq!(call.await.unwrap().unwrap(), first);
    }
    panic!("no call landed on the instance to crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_reach_the_server() {
    let nodes = cluster(2).await;
    let dropped = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    struct OnDrop(Arc<AtomicUsize>, Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            if !self.1.load(Ordering::SeqCst) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let (d, f) = (dropped.clone(), finished.clone());
    nodes[1]
        .serve(
            RpcService::new("sleepy").method("sleep", move |millis: u64| {
                let (d, f) = (d.clone(), f.clone());
                async move {
                    let done = Arc::new(AtomicBool::new(false));
                    let _guard = OnDrop(d, done.clone());
                    tokio::time::sleep(Duration::from_millis(millis)).await;
                    done.store(true, Ordering::SeqCst);
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .await
        .unwrap();
    instances_visible(&nodes[0], "sleepy", 1).await;
    let client = nodes[0]
        .client("sleepy")
        .timeout(Duration::from_millis(300));
    let began = Instant::now();
    let error = client.call::<u64, ()>("sleep", &5_000).await.unwrap_err();
    assert_eq!(error, RpcError::Timeout(Duration::from_millis(300)));
    assert!(began.elapsed() < Duration::from_secs(2));
    // The server dropped the work too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while dropped.load(Ordering::SeqCst) < 1 {
        assert!(
            Instant::now() < deadline,
            "server kept running a call past its deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Dropping the call's future cancels it on the server.
    let long = nodes[0].client("sleepy").timeout(Duration::from_secs(30));
    let call = tokio::spawn(async move { long.call::<u64, ()>("sleep", &20_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    let deadline = Instant::now() + Duration::from_secs(3);
    while dropped.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "a cancelled call kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_stalled_connections_do_not_hurt_other_callers() {
    let nodes = cluster(2).await;
    nodes[1].serve(adder("node-1")).await.unwrap();
    instances_visible(&nodes[0], "math", 1).await;
    let addr = nodes[1].addr();
    let preface = grapevine::node::rpc_preface();

    // A client that sends half a frame and stalls.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&preface_frame(&preface)).await.unwrap();
    stalled.write_all(&[0, 0, 1, 0, 9, 9]).await.unwrap();

    // A garbage frame, and an oversized length prefix: each closes its own connection.
    for junk in [
        vec![0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef],
        vec![0xff, 0xff, 0xff, 0xff, 0],
    ] {
        let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
        bad.write_all(&preface_frame(&preface)).await.unwrap();
        bad.write_all(&junk).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, bad.read(&mut buf))
            .await
            .expect("closed promptly");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "connection should be closed: {read:?}"
        );
    }

    // Everyone else is served as usual.
    let client = nodes[0].client("math");
    for i in 0..100 {
        let sum: Sum = client.call("add", &Add { a: i, b: i }).await.unwrap();
        assert_eq!(sum.sum, 2 * i);
    }
    drop(stalled);
}

/// The hello and the RPC preface, framed, as a client opens an RPC connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_request_and_reply_cross_a_fresh_connection() {
    let nodes = cluster(2).await;
    let blob =
        RpcService::new("blob").method("reverse", |mut bytes: serde_bytes::ByteBuf| async move {
            bytes.reverse();
            Ok(bytes)
        });
    nodes[1].serve(blob).await.unwrap();
    instances_visible(&nodes[0], "blob", 1).await;
    let request: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    // The first call opens the connection: its first frame after the preface is 1 MiB.
    let reply: serde_bytes::ByteBuf = nodes[0]
        .client("blob")
        .call("reverse", &serde_bytes::ByteBuf::from(request.clone()))
        .await
        .unwrap();
    let mut expected = request;
    expected.reverse();
    assert!(
        reply.into_vec() == expected,
        "the reply is not the reversed request"
    );
}

fn preface_frame(preface: &[u8]) -> Vec<u8> {
    let mut frames = Vec::new();
    for payload in [&grapevine::wire::hello_frame()[..], preface] {
        frames.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frames.extend_from_slice(payload);
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_drains_in_flight_calls_and_refuses_new_ones() {
    let nodes = cluster(3).await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    nodes[1]
        .serve(slow_service("node-1", started_tx.clone()))
        .await
        .unwrap();
    instances_visible(&nodes[0], "slow", 1).await;
    let client = nodes[0].client("slow").timeout(Duration::from_secs(10));
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call::<u64, String>("work", &800).await }
    });
    tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    let leaving = tokio::spawn(async move {
        let node = &nodes[1];
        node.leave().await.unwrap();
        nodes
    });
    // The running call finishes although its node is leaving.
    assert_eq!(call.await.unwrap().unwrap(), "node-1");
    let nodes = leaving.await.unwrap();
    // Once gone, the service has no instance left.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match client.call::<u64, String>("work", &1).await {
            Err(RpcError::NoInstances(_)) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still answered: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_trace_context_reaches_the_handler() {
    use grapevine::rpc::TraceContext;
    let nodes = cluster(2).await;
    // The handler answers with the context it runs under, as a W3C traceparent.
    nodes[1]
        .serve(
            RpcService::new("trace").method("whoami", |(): ()| async move {
                Ok(TraceContext::current().map(|context| context.traceparent()))
            }),
        )
        .await
        .unwrap();
    instances_visible(&nodes[0], "trace", 1).await;
    let client = nodes[0].client("trace");

    let root = TraceContext::new_root();
    let seen = root
        .scope(client.call::<(), Option<String>>("whoami", &()))
        .await
        .unwrap()
        .expect("the handler ran without the caller's trace context");
    let seen = TraceContext::parse_traceparent(&seen).unwrap();
    assert_eq!(seen.trace_id, root.trace_id, "the server saw another trace");
    // The server's parent is the caller's `rpc.call` span, a child of the root.
    assert_ne!(seen.span_id, root.span_id);
    assert!(seen.sampled);

    // Outside any trace (and with `rpc.call` not recorded) nothing travels.
    let untraced = client.call::<(), Option<String>>("whoami", &()).await;
    assert_eq!(untraced.unwrap(), None);
}
