//! The sidecar HTTP API against in-process nodes: every endpoint with good and bad input,
//! blocking queries (on change and on timeout), SSE streams, limits, metrics, shutdown.

mod http_support;

use std::sync::Arc;
use std::time::Duration;

use grapevine::http::{HttpOptions, HttpServer};
use grapevine::{AppError, Node, Profile, RpcService};
use http_support::{get, put, request, SseStream};
use serde_json::{json, Value};

const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn node(name: &str, seeds: &[std::net::SocketAddr]) -> Arc<Node> {
    Arc::new(
        Node::builder(name)
            .profile(Profile::Local)
            .seeds(seeds.iter().copied())
            .start()
            .await
            .expect("node starts"),
    )
}

/// Serves `node`'s API once the node has published its first view (index 1).
async fn serve(node: &Arc<Node>, options: HttpOptions) -> HttpServer {
    let catalog = node.catalog();
    tokio::time::timeout(Duration::from_secs(10), catalog.wait_past(0))
        .await
        .expect("first view published");
    HttpServer::start(node.clone(), "127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("HTTP API starts")
}

/// Polls `check` every 50 ms for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn register_lookup_check_deregister() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();

    // Good registrations: no check (passing), TTL (critical until passed), TCP.
    let reply = put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"web","id":"web-1","port":8080,"tags":["v1","eu"],"meta":{"zone":"eu-1"}}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"id": "web-1", "health": "passing"}));
    let reply = put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"web","id":"web-2","port":8081,"tags":["v2"],"check":{"ttl":"30s"}}"#,
    )
    .await;
    assert_eq!(reply.json()["health"], "critical");
    let reply = put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"db","port":1,"address":"127.0.0.1","check":{"tcp":"10s"}}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["id"], "db", "the id defaults to the name");

    // Lookups: all instances by default, ?passing, tag filters, unknown service.
    let all = get(addr, "/v1/health/service/web").await;
    assert_eq!(all.status, 200);
    assert_eq!(all.json().as_array().unwrap().len(), 2);
    let passing = get(addr, "/v1/health/service/web?passing").await.json();
    assert_eq!(passing.as_array().unwrap().len(), 1);
    assert_eq!(passing[0]["id"], "web-1");
    assert_eq!(passing[0]["meta"]["zone"], "eu-1");
    let tagged = get(addr, "/v1/health/service/web?tag=v1&tag=eu")
        .await
        .json();
    assert_eq!(tagged.as_array().unwrap().len(), 1);
    let none = get(addr, "/v1/health/service/web?tag=v1&tag=v2")
        .await
        .json();
    assert_eq!(none, json!([]));
    let unknown = get(addr, "/v1/health/service/nothing-here").await;
    assert_eq!((unknown.status, unknown.json()), (200, json!([])));

    // The TTL check: pass, warn, fail, each visible in lookups.
    for (verdict, health) in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ] {
        let reply = put(addr, &format!("/v1/agent/check/{verdict}/web-2"), b"").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        eventually(&format!("web-2 {health}"), || async {
            get(addr, "/v1/health/service/web").await.json()[1]["health"] == health
        })
        .await;
    }
    let reply = put(addr, "/v1/agent/check/pass/web-2?note=fine", b"").await;
    assert_eq!(reply.status, 200);
    let reply = put(addr, "/v1/agent/check/pass/nope", b"").await;
    assert_eq!(reply.status, 404);
    assert!(reply.error().contains("nope"), "{}", reply.error());
    let reply = put(addr, "/v1/agent/check/maybe/web-2", b"").await;
    assert_eq!(reply.status, 404);

    // Listings.
    let services = get(addr, "/v1/catalog/services").await;
    assert_eq!(services.status, 200);
    assert!(services.index() > 0);
    let services = services.json();
    assert_eq!(services["web"]["instances"], 2);
    assert_eq!(services["web"]["tags"], json!(["eu", "v1", "v2"]));
    let local = get(addr, "/v1/agent/services").await.json();
    assert_eq!(
        local.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["db", "web-1", "web-2"]
    );
    let members = get(addr, "/v1/agent/members").await.json();
    assert_eq!(members[0]["name"], "a");
    assert_eq!(members[0]["status"], "alive");
    let me = get(addr, "/v1/agent/self").await.json();
    assert_eq!(me["node"]["name"], "a");
    assert!(me["stats"]["udp_sent"].is_u64());

    // Deregistration, then the id is unknown.
    let reply = put(addr, "/v1/agent/service/deregister/web-2", b"").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        get(addr, "/v1/health/service/web")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let reply = put(addr, "/v1/agent/service/deregister/web-2", b"").await;
    assert_eq!(reply.status, 404);
    let reply = put(addr, "/v1/agent/check/pass/web-2", b"").await;
    assert_eq!(reply.status, 404, "a deregistered service has no check");
    http.shutdown().await;
}

#[tokio::test]
async fn bad_registrations_are_refused_with_reasons() {
    let a = node("a", &[]).await;
    let options = HttpOptions {
        max_body: 16 * 1024,
        ..HttpOptions::default()
    };
    let http = serve(&a, options).await;
    let addr = http.local_addr();
    let huge_meta = json!({
        "name": "web", "port": 1,
        "meta": (0..100).map(|i| (format!("k{i}"), "v".to_string())).collect::<std::collections::BTreeMap<_, _>>(),
    })
    .to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "missing name",
            r#"{"port":1}"#.into(),
            400,
            "missing field `name`",
        ),
        (
            "missing port",
            r#"{"name":"web"}"#.into(),
            400,
            "missing field `port`",
        ),
        (
            "port as string",
            r#"{"name":"web","port":"80"}"#.into(),
            400,
            "invalid type",
        ),
        (
            "port out of range",
            r#"{"name":"web","port":70000}"#.into(),
            400,
            "invalid value",
        ),
        (
            "port zero",
            r#"{"name":"web","port":0}"#.into(),
            400,
            "port",
        ),
        (
            "tags not a list",
            r#"{"name":"web","port":1,"tags":"v1"}"#.into(),
            400,
            "invalid type",
        ),
        (
            "unknown field",
            r#"{"name":"web","port":1,"Port":2}"#.into(),
            400,
            "unknown field",
        ),
        ("bad name", r#"{"name":"we b","port":1}"#.into(), 400, "' '"),
        (
            "bad address",
            r#"{"name":"web","port":1,"address":"x"}"#.into(),
            400,
            "invalid",
        ),
        (
            "two checks",
            r#"{"name":"web","port":1,"check":{"ttl":"1s","tcp":"1s"}}"#.into(),
            400,
            "exactly one",
        ),
        (
            "no check kind",
            r#"{"name":"web","port":1,"check":{}}"#.into(),
            400,
            "exactly one",
        ),
        (
            "bad ttl",
            r#"{"name":"web","port":1,"check":{"ttl":"soon"}}"#.into(),
            400,
            "check.ttl",
        ),
        (
            "ttl too short",
            r#"{"name":"web","port":1,"check":{"ttl":"1ms"}}"#.into(),
            400,
            "between",
        ),
        ("too much meta", huge_meta, 400, "meta"),
        ("not JSON", "name=web".into(), 400, "invalid JSON"),
        ("empty body", String::new(), 400, "JSON body is required"),
        (
            "oversized body",
            format!(
                r#"{{"name":"web","port":1,"tags":["{}"]}}"#,
                "x".repeat(20_000)
            ),
            413,
            "too large",
        ),
    ];
    for (what, body, status, needle) in cases {
        let reply = put(addr, "/v1/agent/service/register", body.as_bytes()).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert!(
            reply.error().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            reply.error()
        );
    }
    assert_eq!(get(addr, "/v1/catalog/services").await.json(), json!({}));
    // Streams check their input before they start.
    for path in [
        "/v1/stream/catalog?service=bad%20name",
        "/v1/stream/catalog?services=web",
        "/v1/stream/kv/prod?index=soon",
    ] {
        let stream = SseStream::open(addr, path, &[]).await;
        assert_eq!(stream.status, 400, "{path}");
    }
    // Wrong method and unknown routes.
    let reply = get(addr, "/v1/agent/service/register").await;
    assert_eq!(reply.status, 405);
    let reply = get(addr, "/v1/nothing").await;
    assert_eq!(reply.status, 404);
    assert!(reply.error().contains("no such endpoint"));
    // Bad query parameters.
    for path in [
        "/v1/health/service/web?tags=v1",
        "/v1/health/service/web?passing=maybe",
        "/v1/health/service/web?index=-1",
        "/v1/health/service/web?index=1&wait=forever",
        "/v1/health/service/bad%20name",
        "/v1/catalog/services?wait=10x",
        "/metrics?x=1",
        "/v1/agent/members?index=x",
        "/v1/agent/services?wait=-1s",
        "/v1/agent/self?verbose",
        "/v1/status?x=1",
        "/v1/kv?recurse=2",
        "/v1/kv/prod/x?index=1&wait=1d",
    ] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
        assert!(!reply.error().is_empty());
    }
    http.shutdown().await;
}

#[tokio::test]
async fn config_endpoints() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();

    let reply = put(addr, "/v1/kv/prod/orders/max_conn", b"100").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["seq"], 1);
    put(addr, "/v1/kv/prod/orders/limits", b"[10,20]").await;
    put(addr, "/v1/kv/prod/payments/url", b"http://pay").await;
    let binary = put(addr, "/v1/kv/prod/blob/key", &[0xff, 0x00, 0xfe]).await;
    assert_eq!(binary.status, 200);

    let reply = get(addr, "/v1/kv/prod/orders/max_conn").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.index(), 4);
    assert_eq!(
        reply.json(),
        json!({"key": "prod/orders/max_conn", "value": "100"})
    );
    let raw = get(addr, "/v1/kv/prod/orders/max_conn?raw").await;
    assert_eq!(raw.body, b"100");
    assert_eq!(
        get(addr, "/v1/kv/prod/blob/key").await.json()["value_base64"],
        "/wD+"
    );
    let listed = get(addr, "/v1/kv/prod/orders?recurse").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["key"], "prod/orders/limits");
    let keys = get(addr, "/v1/kv?keys").await.json();
    assert_eq!(
        keys,
        json!([
            "prod/blob/key",
            "prod/orders/limits",
            "prod/orders/max_conn",
            "prod/payments/url"
        ])
    );

    // Absent keys: 404, with the index to block on.
    let absent = get(addr, "/v1/kv/prod/orders/nothing").await;
    assert_eq!(absent.status, 404);
    assert!(absent.error().contains("not set"));
    assert_eq!(absent.index(), 4);
    assert_eq!(get(addr, "/v1/kv/staging?recurse").await.status, 404);
    assert_eq!(
        request(addr, "DELETE", "/v1/kv/prod/orders/nothing", b"")
            .await
            .status,
        404
    );

    // Bad input.
    for (what, method, path, body, status) in [
        ("one-segment key", "PUT", "/v1/kv/prod", &b"1"[..], 400),
        ("bad char", "PUT", "/v1/kv/prod/a%20b", b"1", 400),
        ("empty segment", "GET", "/v1/kv/prod//x", b"", 400),
        ("listing without a key", "GET", "/v1/kv", b"", 400),
        ("raw listing", "GET", "/v1/kv/prod?recurse&raw", b"", 400),
        (
            "unknown parameter",
            "GET",
            "/v1/kv/prod/orders/max_conn?cas=1",
            b"",
            400,
        ),
        (
            "value over 64 KiB",
            "PUT",
            "/v1/kv/prod/big/value",
            &[b'x'; 70_000][..],
            413,
        ),
        (
            "body over the limit",
            "PUT",
            "/v1/kv/prod/big/value",
            &[b'x'; 200_000][..],
            413,
        ),
    ] {
        let reply = request(addr, method, path, body).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert!(!reply.error().is_empty(), "{what}");
    }

    // Delete.
    let reply = request(addr, "DELETE", "/v1/kv/prod/orders/max_conn", b"").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(get(addr, "/v1/kv/prod/orders/max_conn").await.status, 404);
    http.shutdown().await;
}

#[tokio::test]
async fn blocking_queries_return_on_change_and_on_timeout() {
    let a = node("a", &[]).await;
    let options = HttpOptions {
        max_wait: Duration::from_secs(2),
        ..HttpOptions::default()
    };
    let http = serve(&a, options).await;
    let addr = http.local_addr();

    // Catalog: block on the current index, then register: the query returns with more.
    let first = get(addr, "/v1/health/service/web").await;
    let index = first.index();
    let started = tokio::time::Instant::now();
    let waiting = tokio::spawn(async move {
        get(
            addr,
            &format!("/v1/health/service/web?index={index}&wait=30s"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the query did not block");
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"web","port":80}"#,
    )
    .await;
    let changed = waiting.await.unwrap();
    assert_eq!(changed.status, 200);
    assert!(changed.index() > index);
    assert_eq!(changed.json()[0]["port"], 80);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "returned on change, not on timeout"
    );

    // A change elsewhere in the catalog moves the index but does not answer the query.
    let index = changed.index();
    let waiting = tokio::spawn(async move {
        get(
            addr,
            &format!("/v1/health/service/web?index={index}&wait=30s"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"other","port":81}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "woken by another service");
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"web","id":"web-2","port":82}"#,
    )
    .await;
    let changed = waiting.await.unwrap();
    assert_eq!(changed.json().as_array().unwrap().len(), 2);
    assert!(changed.index() >= index + 2);

    // Timeout: nothing changes, the query answers the same view with the same index.
    let index = changed.index();
    let started = tokio::time::Instant::now();
    let quiet = get(
        addr,
        &format!("/v1/health/service/web?index={index}&wait=500ms"),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(quiet.status, 200);
    assert_eq!(quiet.index(), index);
    assert!(
        took >= Duration::from_millis(450),
        "returned after {took:?}"
    );
    // `wait` is capped (2 s here).
    let started = tokio::time::Instant::now();
    let capped = get(
        addr,
        &format!("/v1/catalog/services?index={index}&wait=10m"),
    )
    .await;
    assert_eq!(capped.status, 200);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "capped wait took {took:?}"
    );
    // An index from the future answers at once with the current one.
    let reply = get(addr, "/v1/catalog/services?index=999999&wait=10s").await;
    assert_eq!(reply.index(), index);

    // Config: a blocking read of one key returns when that key changes, not another one.
    let set = put(addr, "/v1/kv/prod/app/flag", b"off").await;
    let seq = set.json()["seq"].as_u64().unwrap();
    let waiting = tokio::spawn(async move {
        get(addr, &format!("/v1/kv/prod/app/flag?index={seq}&wait=30s")).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    put(addr, "/v1/kv/prod/other/key", b"x").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "woken by another key");
    put(addr, "/v1/kv/prod/app/flag", b"on").await;
    let changed = waiting.await.unwrap();
    assert_eq!(changed.json()["value"], "on");
    assert_eq!(changed.index(), seq + 2);
    let quiet = get(
        addr,
        &format!("/v1/kv/prod/app/flag?index={}&wait=300ms", seq + 2),
    )
    .await;
    assert_eq!((quiet.status, quiet.index()), (200, seq + 2));
    http.shutdown().await;
}

#[tokio::test]
async fn watchers_are_capped() {
    let a = node("a", &[]).await;
    let options = HttpOptions {
        max_watchers: 1,
        ..HttpOptions::default()
    };
    let http = serve(&a, options).await;
    let addr = http.local_addr();
    let index = get(addr, "/v1/catalog/services").await.index();
    let holder = tokio::spawn(async move {
        get(addr, &format!("/v1/catalog/services?index={index}&wait=3s")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = get(addr, &format!("/v1/catalog/services?index={index}&wait=3s")).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.error().contains("too many"));
    let stream = SseStream::open(addr, "/v1/stream/catalog", &[]).await;
    assert_eq!(stream.status, 429);
    // Non-blocking reads are never refused.
    assert_eq!(get(addr, "/v1/catalog/services").await.status, 200);
    let metrics = get(addr, "/metrics").await.text();
    assert!(metrics.contains("grapevine_http_watchers 1"), "{metrics}");
    assert!(
        metrics.contains("grapevine_http_watchers_refused_total 2"),
        "{metrics}"
    );
    assert_eq!(holder.await.unwrap().status, 200);
    http.shutdown().await;
}

#[tokio::test]
async fn sse_streams_deliver_changes_and_end_with_the_server() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();

    let mut kv = SseStream::open(addr, "/v1/stream/kv/prod", &[]).await;
    assert_eq!(kv.status, 200);
    let mut catalog = SseStream::open(addr, "/v1/stream/catalog?service=web&passing", &[]).await;
    let first = catalog
        .next(EVENT_WAIT)
        .await
        .expect("initial catalog event");
    assert_eq!((first.event.as_str(), first.json()), ("catalog", json!([])));

    put(addr, "/v1/kv/staging/x/y", b"not under prod").await;
    put(addr, "/v1/kv/prod/a/b", b"1").await;
    request(addr, "DELETE", "/v1/kv/prod/a/b", b"").await;
    let set = kv.next(EVENT_WAIT).await.expect("set event");
    assert_eq!(set.event, "set");
    assert_eq!(set.id.as_deref(), Some("2"));
    assert_eq!(
        set.json()["entry"],
        json!({"key": "prod/a/b", "value": "1"})
    );
    let deleted = kv.next(EVENT_WAIT).await.expect("delete event");
    assert_eq!(deleted.event, "delete");
    assert_eq!(deleted.json()["key"], "prod/a/b");

    // Resuming with Last-Event-ID replays what came after it.
    let mut resumed = SseStream::open(addr, "/v1/stream/kv/prod", &[("Last-Event-ID", "1")]).await;
    let replay = resumed.next(EVENT_WAIT).await.expect("replayed event");
    assert_eq!(
        (replay.event.as_str(), replay.id.as_deref()),
        ("set", Some("2"))
    );
    let bad = SseStream::open(addr, "/v1/stream/kv/prod", &[("Last-Event-ID", "x")]).await;
    assert_eq!(bad.status, 400);

    // The catalog stream sees the registration, and the health change.
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"web","port":80,"check":{"ttl":"1m"}}"#,
    )
    .await;
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"other","port":81}"#,
    )
    .await;
    put(addr, "/v1/agent/check/pass/web", b"").await;
    let passing = catalog.next(EVENT_WAIT).await.expect("catalog change");
    assert_eq!(passing.json()[0]["id"], "web", "{passing:?}");
    assert_eq!(passing.json()[0]["health"], "passing");

    // Shutting the server down ends every stream.
    http.shutdown().await;
    assert!(kv.closed_within(Duration::from_secs(5)).await);
    assert!(catalog.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn two_nodes_metrics_and_status() {
    let a = node("a", &[]).await;
    let b = node("b", &[a.addr()]).await;
    let http_a = serve(&a, HttpOptions::default()).await;
    let http_b = serve(&b, HttpOptions::default()).await;
    let (addr_a, addr_b) = (http_a.local_addr(), http_b.local_addr());

    // Registered through a, found through b.
    put(
        addr_a,
        "/v1/agent/service/register",
        br#"{"name":"api","port":9000,"tags":["v3"]}"#,
    )
    .await;
    put(addr_a, "/v1/kv/prod/api/timeout", b"5s").await;
    eventually("b sees a's service and key", || async {
        get(addr_b, "/v1/health/service/api?passing&tag=v3")
            .await
            .json()
            != json!([])
            && get(addr_b, "/v1/kv/prod/api/timeout").await.status == 200
    })
    .await;

    let metrics = get(addr_b, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text();
    let value = |line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{line} missing from:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("grapevine_members{status=\"alive\"}"), 2.0);
    assert_eq!(value("grapevine_members{status=\"down\"}"), 0.0);
    assert!(value("grapevine_gossip_packets_total{direction=\"in\"}") > 0.0);
    assert!(value("grapevine_gossip_bytes_total{direction=\"out\"}") > 0.0);
    assert_eq!(value("grapevine_config_keys"), 1.0);
    assert_eq!(
        value("grapevine_catalog_instances{health=\"passing\"}"),
        1.0
    );
    value("grapevine_broadcast_queue_depth");
    value("grapevine_anti_entropy_rounds_total{result=\"ok\"}");
    value("grapevine_tcp_sync_bytes_total");
    value("grapevine_rpc_in_flight");
    assert_eq!(value("grapevine_failure_detector_stalls_total"), 0.0);
    value("grapevine_sync_suppressed_total{exchange=\"anti_entropy\"}");
    value("grapevine_sync_suppressed_total{exchange=\"push_pull\"}");
    value("grapevine_http_watchers");
    // Request latency, per route, from the requests above.
    assert!(
        text.contains("grapevine_http_request_duration_seconds_count{route=\"/v1/health/service/{name}\",method=\"GET\",status=\"200\"}"),
        "{text}"
    );
    // RPC figures per service: b serves `adder`, a calls it (two answers, one app error).
    b.serve(
        RpcService::new("adder").method("add", |(x, y): (u32, u32)| async move {
            x.checked_add(y).ok_or(AppError::new(1, "overflow"))
        }),
    )
    .await
    .unwrap();
    eventually("a sees b's rpc service", || async {
        !a.catalog().lookup("adder").is_empty()
    })
    .await;
    let adder = a.client("adder");
    assert_eq!(adder.call::<_, u32>("add", &(2u32, 3u32)).await, Ok(5));
    assert_eq!(adder.call::<_, u32>("add", &(4u32, 4u32)).await, Ok(8));
    assert!(adder
        .call::<_, u32>("add", &(u32::MAX, 1u32))
        .await
        .is_err());
    let text_b = get(addr_b, "/metrics").await.text();
    let server = "side=\"server\",service=\"adder\"";
    assert!(
        text_b.contains(&format!("grapevine_rpc_calls_total{{{server}}} 3")),
        "{text_b}"
    );
    assert!(
        text_b.contains(&format!(
            "grapevine_rpc_errors_total{{{server},kind=\"remote\"}} 1"
        )),
        "{text_b}"
    );
    assert!(
        text_b.contains(&format!(
            "grapevine_rpc_duration_seconds_bucket{{{server},le=\"+Inf\"}} 3"
        )),
        "{text_b}"
    );
    // Each server renders its own node only.
    let text_a = get(addr_a, "/metrics").await.text();
    let client = "side=\"client\",service=\"adder\"";
    assert!(
        text_a.contains(&format!("grapevine_rpc_calls_total{{{client}}} 3")),
        "{text_a}"
    );
    assert!(
        text_a.contains(&format!(
            "grapevine_rpc_duration_seconds_count{{{client}}} 3"
        )),
        "{text_a}"
    );
    assert!(!text_a.contains(server), "{text_a}");
    assert!(text_a.contains("grapevine_members{status=\"alive\"} 2"));
    assert!(
        !text_a.contains("route=\"/v1/health/service/{name}\""),
        "b's requests leaked into a's metrics:\n{text_a}"
    );

    // The status page and the data it shows.
    let page = get(addr_a, "/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("/v1/status"));
    let status = get(addr_a, "/v1/status").await.json();
    assert_eq!(status["node"]["name"], "a");
    assert_eq!(status["members"].as_array().unwrap().len(), 2);
    assert!(
        status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["service"] == "api"),
        "{status}"
    );
    assert_eq!(status["config"]["count"], 1);
    assert_eq!(
        status["config"]["keys"][0],
        json!({"key": "prod/api/timeout", "preview": "5s", "bytes": 2})
    );
    let _: Value = status;
    http_a.shutdown().await;
    http_b.shutdown().await;
}

#[tokio::test]
async fn blocking_query_ends_at_shutdown() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();
    let index = get(addr, "/v1/catalog/services").await.index();
    let waiting = tokio::spawn(async move {
        get(addr, &format!("/v1/catalog/services?index={index}&wait=5m")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    http.shutdown().await;
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the blocked query ended with the server")
        .unwrap();
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}

#[tokio::test]
async fn connections_are_capped() {
    let a = node("a", &[]).await;
    let options = HttpOptions {
        max_connections: 2,
        ..HttpOptions::default()
    };
    let http = serve(&a, options).await;
    let addr = http.local_addr();
    // Two idle connections take both slots; a third client waits in the backlog.
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = tokio::spawn(async move { get(addr, "/v1/agent/self").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served beyond the connection cap");
    drop(first);
    let reply = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(reply.status, 200);
    http.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed_but_long_waits_are_not() {
    let a = node("a", &[]).await;
    let options = HttpOptions {
        idle_timeout: Duration::from_millis(500),
        keep_alive: Duration::from_millis(100),
        ..HttpOptions::default()
    };
    let http = serve(&a, options).await;
    let addr = http.local_addr();
    // A client that sends half a request and stops is cut off.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stalled
        .write_all(b"GET /v1/agent/self HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a stalled request kept its connection");
    // A blocking query longer than the idle timeout still gets its answer, and a stream
    // outlives it too.
    let index = get(addr, "/v1/catalog/services").await.index();
    let mut stream = SseStream::open(addr, "/v1/stream/kv", &[]).await;
    let started = tokio::time::Instant::now();
    let reply = get(
        addr,
        &format!("/v1/catalog/services?index={index}&wait=1500ms"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    put(addr, "/v1/kv/prod/late/key", b"1").await;
    let event = stream
        .next(EVENT_WAIT)
        .await
        .expect("the stream outlived the idle timeout");
    assert_eq!(event.event, "set");
    http.shutdown().await;
}
