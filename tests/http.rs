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

/// Every answer carries Consul's headers, errors included.
fn consul_headers(reply: &http_support::Reply) {
    assert!(reply.index() >= 1, "{reply:?}");
    assert_eq!(
        reply.header("x-consul-knownleader"),
        Some("true"),
        "{reply:?}"
    );
    assert_eq!(reply.header("x-consul-lastcontact"), Some("0"), "{reply:?}");
}

#[tokio::test]
async fn agent_catalog_and_health_answer_in_consul_shapes() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();

    // Consul's registration body; keys are case-insensitive, as Consul decodes them.
    let reply = put(
        addr,
        "/v1/agent/service/register",
        br#"{"Name":"web","ID":"web-1","Port":8080,"Tags":["v1","eu"],"Meta":{"team":"core"},
             "Weights":{"Passing":3,"Warning":1},"EnableTagOverride":true}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.body.is_empty());
    consul_headers(&reply);
    let reply = put(
        addr,
        "/v1/agent/service/register",
        br#"{"name":"web","id":"web-2","port":8081,"tags":["v2"],"check":{"ttl":"1m","notes":"reports in"}}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let services = get(addr, "/v1/agent/services").await;
    consul_headers(&services);
    let services = services.json();
    let web1 = &services["web-1"];
    assert_eq!(web1["ID"], "web-1");
    assert_eq!(web1["Service"], "web");
    assert_eq!(web1["Port"], 8080);
    assert_eq!(web1["Tags"], json!(["v1", "eu"]));
    assert_eq!(web1["Meta"], json!({"team": "core"}));
    assert_eq!(web1["Weights"], json!({"Passing": 3, "Warning": 1}));
    assert_eq!(web1["EnableTagOverride"], true);
    assert_eq!(web1["Datacenter"], "dc1");
    assert_eq!(web1["Address"], "127.0.0.1");
    assert_eq!(
        get(addr, "/v1/agent/service/web-2").await.json()["Port"],
        8081
    );
    let missing = get(addr, "/v1/agent/service/nope").await;
    assert_eq!(missing.status, 404);
    consul_headers(&missing);

    // The TTL check: id `service:{id}`, critical until passed.
    let checks = get(addr, "/v1/agent/checks").await.json();
    let check = &checks["service:web-2"];
    assert_eq!(check["CheckID"], "service:web-2");
    assert_eq!(check["Status"], "critical");
    assert_eq!(check["ServiceID"], "web-2");
    assert_eq!(check["ServiceName"], "web");
    assert_eq!(check["Notes"], "reports in");
    assert_eq!(check["Type"], "ttl");
    assert_eq!(check["Node"], "a");
    assert_eq!(checks.as_object().unwrap().len(), 1, "{checks}");

    // health/service: Node, Service, Checks (serfHealth first); ?passing, ?tag, ?near.
    let all = get(addr, "/v1/health/service/web").await.json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let entry = &all[0];
    assert_eq!(entry["Node"]["Node"], "a");
    assert_eq!(entry["Node"]["Address"], "127.0.0.1");
    assert_eq!(entry["Node"]["Datacenter"], "dc1");
    assert_eq!(entry["Node"]["ID"].as_str().unwrap().len(), 36);
    assert_eq!(entry["Service"]["ID"], "web-1");
    assert_eq!(entry["Checks"][0]["CheckID"], "serfHealth");
    assert_eq!(entry["Checks"][0]["Status"], "passing");
    assert_eq!(all[1]["Checks"][1]["CheckID"], "service:web-2");
    let passing = get(addr, "/v1/health/service/web?passing").await.json();
    assert_eq!(passing.as_array().unwrap().len(), 1);
    let tagged = get(addr, "/v1/health/service/web?tag=v1&tag=eu&near=_agent")
        .await
        .json();
    assert_eq!(tagged[0]["Service"]["ID"], "web-1");
    assert_eq!(
        get(addr, "/v1/health/service/web?tag=v1&tag=v2")
            .await
            .json(),
        json!([])
    );
    assert_eq!(
        get(addr, "/v1/health/service/nothing").await.json(),
        json!([])
    );

    // Pass, warn, fail, update; the note becomes the output.
    for (verdict, status) in [
        ("warn", "warning"),
        ("fail", "critical"),
        ("pass", "passing"),
    ] {
        let reply = put(
            addr,
            &format!("/v1/agent/check/{verdict}/service:web-2?note=ok"),
            b"",
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let checks = get(addr, "/v1/agent/checks").await.json();
        assert_eq!(checks["service:web-2"]["Status"], status);
        assert_eq!(checks["service:web-2"]["Output"], "ok");
    }
    let reply = put(
        addr,
        "/v1/agent/check/update/service:web-2",
        br#"{"Status":"warning","Output":"slow disk"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let check = &get(addr, "/v1/agent/checks").await.json()["service:web-2"];
    assert_eq!(
        (check["Status"].clone(), check["Output"].clone()),
        (json!("warning"), json!("slow disk"))
    );
    let reply = put(
        addr,
        "/v1/agent/check/update/service:web-2",
        br#"{"Status":"fine"}"#,
    )
    .await;
    assert_eq!(reply.status, 400);
    let reply = put(addr, "/v1/agent/check/pass/service:nope", b"").await;
    assert_eq!(reply.status, 404);
    assert!(reply.error().contains("Unknown check ID"));
    consul_headers(&reply);
    let reply = put(addr, "/v1/agent/check/maybe/service:web-2", b"").await;
    assert_eq!(reply.status, 404);

    // health/checks, health/node, health/state.
    let checks = get(addr, "/v1/health/checks/web").await.json();
    assert_eq!(checks.as_array().unwrap().len(), 1, "{checks}");
    assert_eq!(checks[0]["Status"], "warning");
    let node_checks = get(addr, "/v1/health/node/a").await.json();
    assert_eq!(node_checks[0]["CheckID"], "serfHealth");
    assert_eq!(node_checks.as_array().unwrap().len(), 2);
    assert_eq!(get(addr, "/v1/health/node/zz").await.json(), json!([]));
    let warning = get(addr, "/v1/health/state/warning").await.json();
    assert_eq!(warning[0]["CheckID"], "service:web-2");
    assert_eq!(
        get(addr, "/v1/health/state/any")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(get(addr, "/v1/health/state/bogus").await.status, 400);

    // Catalog.
    assert_eq!(
        get(addr, "/v1/catalog/services").await.json(),
        json!({"web": ["eu", "v1", "v2"]})
    );
    let listed = get(addr, "/v1/catalog/service/web?tag=v1").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let service = &listed[0];
    assert_eq!(service["Node"], "a");
    assert_eq!(service["ServiceID"], "web-1");
    assert_eq!(service["ServiceName"], "web");
    assert_eq!(service["ServicePort"], 8080);
    assert_eq!(service["ServiceAddress"], "127.0.0.1");
    assert_eq!(service["ServiceTags"], json!(["v1", "eu"]));
    assert_eq!(
        service["ServiceWeights"],
        json!({"Passing": 3, "Warning": 1})
    );
    assert_eq!(service["Datacenter"], "dc1");
    assert_eq!(
        get(addr, "/v1/catalog/service/nothing").await.json(),
        json!([])
    );
    let nodes = get(addr, "/v1/catalog/nodes").await.json();
    assert_eq!(nodes[0]["Node"], "a");
    assert_eq!(nodes[0]["TaggedAddresses"]["lan"], "127.0.0.1");
    let node = get(addr, "/v1/catalog/node/a").await.json();
    assert_eq!(node["Node"]["Node"], "a");
    assert_eq!(node["Services"]["web-2"]["Port"], 8081);
    assert_eq!(get(addr, "/v1/catalog/node/zz").await.json(), Value::Null);
    assert_eq!(
        get(addr, "/v1/catalog/datacenters").await.json(),
        json!(["dc1"])
    );

    // Agent, status.
    let members = get(addr, "/v1/agent/members").await.json();
    assert_eq!(members[0]["Name"], "a");
    assert_eq!(members[0]["Addr"], "127.0.0.1");
    assert_eq!(members[0]["Port"], a.addr().port());
    assert_eq!(members[0]["Status"], 1);
    let me = get(addr, "/v1/agent/self").await.json();
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    assert_eq!(me["Config"]["NodeName"], "a");
    assert_eq!(me["Member"]["Name"], "a");
    assert_eq!(
        get(addr, "/v1/status/leader").await.json(),
        json!(a.addr().to_string())
    );
    assert_eq!(
        get(addr, "/v1/status/peers").await.json(),
        json!([a.addr().to_string()])
    );
    assert_eq!(
        put(addr, &format!("/v1/agent/join/{}", a.addr()), b"")
            .await
            .status,
        200
    );
    // Nothing answers on port 1: a Consul-style error after the bounded wait.
    let refused = put(addr, "/v1/agent/join/127.0.0.1:1", b"").await;
    assert_eq!(refused.status, 500);
    assert!(
        refused.text().contains("Failed to join 127.0.0.1:1"),
        "{}",
        refused.text()
    );
    assert_eq!(
        put(addr, &format!("/v1/agent/join/{}?wan", a.addr()), b"")
            .await
            .status,
        400
    );
    assert_eq!(put(addr, "/v1/agent/force-leave/zz", b"").await.status, 404);
    // A live member stays, as Consul leaves an alive and reachable one in place.
    assert_eq!(put(addr, "/v1/agent/force-leave/a", b"").await.status, 200);
    assert_eq!(
        put(addr, "/v1/agent/force-leave/a?wan", b"").await.status,
        400
    );
    assert_eq!(
        put(addr, "/v1/agent/force-leave/a?prune=maybe", b"")
            .await
            .status,
        400
    );
    let pretty = get(addr, "/v1/catalog/datacenters?pretty").await.text();
    assert!(pretty.contains('\n'), "{pretty}");

    // ?dc must be this one; ?stale and ?consistent are accepted, not together.
    assert_eq!(
        get(addr, "/v1/catalog/services?dc=dc1&stale").await.status,
        200
    );
    assert_eq!(
        get(addr, "/v1/catalog/services?consistent").await.status,
        200
    );
    let other = get(addr, "/v1/catalog/services?dc=dc2").await;
    assert_eq!(other.status, 400);
    assert!(other.error().contains("datacenter"));
    assert_eq!(
        get(addr, "/v1/catalog/services?stale&consistent")
            .await
            .status,
        400
    );

    // Deregister.
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
    assert_eq!(get(addr, "/v1/agent/checks").await.json(), json!({}));
    let reply = put(addr, "/v1/agent/service/deregister/web-2", b"").await;
    assert_eq!(reply.status, 404);
    http.shutdown().await;
}

#[tokio::test]
async fn join_at_run_time_merges_two_lone_agents() {
    let a = node("a", &[]).await;
    let b = node("b", &[]).await;
    let http_a = serve(&a, HttpOptions::default()).await;
    let addr = http_a.local_addr();
    put(
        http_a.local_addr(),
        "/v1/agent/service/register",
        br#"{"name":"web","port":80}"#,
    )
    .await;
    let joined = put(addr, &format!("/v1/agent/join/{}", b.addr()), b"").await;
    assert_eq!(joined.status, 200, "{}", joined.text());
    let members = get(addr, "/v1/agent/members").await.json();
    let names: Vec<_> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"b".to_string()), "{members}");
    // The join is mutual and the state flows: b learns a's service.
    tokio::time::timeout(EVENT_WAIT, b.wait_for_members(|m| m.len() == 2))
        .await
        .expect("b sees a");
    eventually("b sees a's service", || async {
        b.catalog().lookup("web").len() == 1
    })
    .await;
    http_a.shutdown().await;
}

/// `(CreateIndex, ModifyIndex)` of an object of a Consul answer.
fn indexes_of(value: &Value) -> (u64, u64) {
    (
        value["CreateIndex"].as_u64().expect("CreateIndex"),
        value["ModifyIndex"].as_u64().expect("ModifyIndex"),
    )
}

#[tokio::test]
async fn catalog_and_health_records_carry_their_own_indexes() {
    let a = node("idx-a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();
    let register = |body: &'static str| async move {
        let reply = put(addr, "/v1/agent/service/register", body.as_bytes()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    };
    let entry = |id: &'static str| async move {
        let entries = get(addr, "/v1/health/service/web").await.json();
        entries
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["Service"]["ID"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {entries}"))
    };
    register(r#"{"Name":"web","ID":"web-1","Port":80,"Check":{"TTL":"30s","Status":"passing"}}"#)
        .await;
    let one = entry("web-1").await;
    let (create, modify) = indexes_of(&one["Service"]);
    assert!(create > 0 && modify == create, "{one}");
    let node = indexes_of(&one["Node"]);
    assert!(node.0 > 0 && node.0 <= create, "{one}");
    let check = one["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "service:web-1")
        .cloned()
        .expect("the service check");
    assert_eq!(indexes_of(&check).0, create);

    // Another registration leaves web-1's indexes alone, and gets later ones.
    register(r#"{"Name":"web","ID":"web-2","Port":81}"#).await;
    eventually("web-2 listed", || async {
        get(addr, "/v1/health/service/web")
            .await
            .json()
            .as_array()
            .is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(
        indexes_of(&entry("web-1").await["Service"]),
        (create, modify)
    );
    let two = indexes_of(&entry("web-2").await["Service"]);
    assert!(two.0 > create && two.1 == two.0, "{two:?}");

    // A health change moves the check's ModifyIndex, not the service's.
    let reply = put(addr, "/v1/agent/check/fail/service:web-1", b"").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    eventually("web-1 critical", || async {
        entry("web-1").await["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["CheckID"] == "service:web-1" && c["Status"] == "critical")
    })
    .await;
    let failed = entry("web-1").await;
    assert_eq!(indexes_of(&failed["Service"]), (create, modify), "{failed}");
    let check = failed["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "service:web-1")
        .cloned()
        .unwrap();
    let (check_create, check_modify) = indexes_of(&check);
    assert!(check_create == create && check_modify > two.0, "{check}");

    // Re-registering with another tag moves ModifyIndex; CreateIndex stays.
    register(r#"{"Name":"web","ID":"web-1","Port":80,"Tags":["v2"]}"#).await;
    eventually("web-1 retagged", || async {
        entry("web-1").await["Service"]["Tags"] == json!(["v2"])
    })
    .await;
    let (again_create, again_modify) = indexes_of(&entry("web-1").await["Service"]);
    assert!(
        again_create == create && again_modify > check_modify,
        "{again_modify}"
    );

    // The catalog's and the agent's shapes carry the same indexes.
    let listed = get(addr, "/v1/catalog/service/web").await.json();
    let web1 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ServiceID"] == "web-1")
        .cloned()
        .unwrap();
    assert_eq!(indexes_of(&web1), (again_create, again_modify), "{web1}");
    let agent = get(addr, "/v1/agent/service/web-1").await.json();
    assert_eq!(indexes_of(&agent), (again_create, again_modify), "{agent}");
    let nodes = get(addr, "/v1/catalog/nodes").await.json();
    assert_eq!(indexes_of(&nodes[0]).0, node.0, "{nodes}");

    // ?node-meta filters nodes by meta; grapevine nodes carry none, so a filter matches
    // nothing (Consul's empty answers), and ?merge-central-config has nothing to merge.
    for (path, empty) in [
        ("/v1/catalog/services", json!({})),
        ("/v1/catalog/service/web", json!([])),
        ("/v1/catalog/nodes", json!([])),
        ("/v1/health/service/web", json!([])),
        ("/v1/health/checks/web", json!([])),
        ("/v1/health/state/passing", json!([])),
        ("/v1/health/state/any", json!([])),
    ] {
        let reply = get(addr, &format!("{path}?node-meta=rack:r1")).await;
        assert_eq!((reply.status, reply.json()), (200, empty), "{path}");
        let reply = get(addr, &format!("{path}?node-meta=")).await;
        assert_eq!(reply.status, 200, "{path}");
        let unfiltered = get(addr, path).await.json();
        assert_eq!(
            reply.json(),
            unfiltered,
            "{path}: an empty filter filters nothing"
        );
    }
    for path in ["/v1/health/service/web", "/v1/catalog/service/web"] {
        let merged = get(addr, &format!("{path}?merge-central-config")).await;
        assert_eq!(merged.status, 200, "{path}");
        assert_eq!(merged.json().as_array().map(Vec::len), Some(2), "{path}");
    }
    http.shutdown().await;
}

#[tokio::test]
async fn agent_health_of_a_local_service_answers_as_consul_for_load_balancers() {
    let a = node("ah-a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();
    let body = br#"{"Name":"api","ID":"api-1","Port":80,"Check":{"TTL":"30s","Status":"passing"}}"#;
    assert_eq!(
        put(addr, "/v1/agent/service/register", body).await.status,
        200
    );
    let by_id = "/v1/agent/health/service/id/api-1";
    let by_name = "/v1/agent/health/service/name/api";
    let reply = get(addr, by_id).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    consul_headers(&reply);
    let health = reply.json();
    assert_eq!(health["AggregatedStatus"], "passing");
    assert_eq!(health["Service"]["ID"], "api-1");
    assert_eq!(health["Checks"][0]["CheckID"], "service:api-1");
    let text = get(addr, &format!("{by_id}?format=text")).await;
    assert_eq!((text.status, text.text()), (200, "passing".to_string()));
    for (verdict, code, status) in [("warn", 429, "warning"), ("fail", 503, "critical")] {
        let path = format!("/v1/agent/check/{verdict}/service:api-1");
        assert_eq!(put(addr, &path, b"").await.status, 200);
        eventually(status, || async { get(addr, by_id).await.status == code }).await;
        let reply = get(addr, by_id).await;
        assert_eq!(reply.json()["AggregatedStatus"], status);
        let named = get(addr, by_name).await;
        assert_eq!(named.status, code);
        assert_eq!(named.json()[0]["AggregatedStatus"], status);
        let text = get(addr, &format!("{by_name}?format=text")).await;
        assert_eq!((text.status, text.text()), (code, status.to_string()));
    }
    let unknown = get(addr, "/v1/agent/health/service/id/nope").await;
    assert_eq!(unknown.status, 404);
    consul_headers(&unknown);
    assert_eq!(
        get(addr, "/v1/agent/health/service/name/nope").await.status,
        404
    );
    assert_eq!(get(addr, &format!("{by_id}?format=xml")).await.status, 400);
    http.shutdown().await;
}

/// Consul's member `Status` of `name` in a `/v1/agent/members` answer, if listed.
async fn member_status(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    let members = get(addr, "/v1/agent/members").await.json();
    members
        .as_array()?
        .iter()
        .find(|m| m["Name"] == name)
        .and_then(|m| m["Status"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_leave_turns_a_failed_member_left_everywhere_and_prune_drops_it() {
    let a = node("fl-a", &[]).await;
    let b = node("fl-b", &[a.addr()]).await;
    let c = node("fl-c", &[a.addr()]).await;
    for n in [&a, &b, &c] {
        tokio::time::timeout(EVENT_WAIT, n.wait_for_members(|m| m.len() == 3))
            .await
            .expect("three members");
    }
    let _db = c
        .register(grapevine::Service::new("db", "db-1", 5432))
        .await
        .expect("register");
    let (http_a, http_b) = (
        serve(&a, HttpOptions::default()).await,
        serve(&b, HttpOptions::default()).await,
    );
    let (api_a, api_b) = (http_a.local_addr(), http_b.local_addr());
    let healthy = |api| async move {
        get(api, "/v1/health/service/db")
            .await
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    eventually("both see c's service", || async {
        healthy(api_a).await == 1 && healthy(api_b).await == 1
    })
    .await;
    // c crashes (no leave): once a no longer finds it alive, force it out.
    c.shutdown().await;
    eventually("a suspects c", || async {
        a.members()
            .iter()
            .any(|m| m.name == "fl-c" && m.status != grapevine::MemberStatus::Alive)
    })
    .await;
    let reply = put(api_a, "/v1/agent/force-leave/fl-c", b"").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    consul_headers(&reply);
    // Left (3) at once here, and on b by the leave notice; its instance leaves lookups.
    assert_eq!(member_status(api_a, "fl-c").await, Some(3));
    eventually("b sees c left", || async {
        member_status(api_b, "fl-c").await == Some(3)
    })
    .await;
    assert_eq!(healthy(api_a).await, 0);
    eventually("c's service leaves b's lookups", || async {
        healthy(api_b).await == 0
    })
    .await;
    // ?prune drops it from a's member list; b still lists it as left.
    let reply = put(api_a, "/v1/agent/force-leave/fl-c?prune", b"").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(member_status(api_a, "fl-c").await, None);
    assert_eq!(member_status(api_b, "fl-c").await, Some(3));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        member_status(api_a, "fl-c").await,
        None,
        "a pruned member stays out of the list"
    );
    let gone = put(api_a, "/v1/agent/force-leave/fl-c", b"").await;
    assert_eq!(gone.status, 404, "{}", gone.text());
    assert!(gone.error().contains("No node found"), "{}", gone.text());
    http_a.shutdown().await;
    http_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_http_checks_and_deregister_critical() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();
    // A tiny HTTP server: /ok 200, /busy 429, anything else 503.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = target.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if head.starts_with("GET /ok ") {
                    "200 OK"
                } else if head.starts_with("GET /busy ") {
                    "429 Too Many Requests"
                } else {
                    "503 Service Unavailable"
                };
                let _ = stream
                    .write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    for (path, status) in [("ok", "passing"), ("busy", "warning"), ("down", "critical")] {
        let body = json!({"Name": "api", "ID": format!("api-{path}"), "Port": port,
            "Checks": [{"HTTP": format!("http://127.0.0.1:{port}/{path}"), "Interval": "200ms", "Timeout": "1s"}]});
        let reply = put(
            addr,
            "/v1/agent/service/register",
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let checks = get(addr, "/v1/agent/checks").await.json();
        let check = &checks[format!("service:api-{path}")];
        assert_eq!(check["Status"], status, "{path}: {check}");
        assert_eq!(check["Type"], "http");
        assert_eq!(
            check["Definition"]["HTTP"],
            format!("http://127.0.0.1:{port}/{path}")
        );
    }
    // TCP: passing while the port answers.
    let body = json!({"Name": "tcp", "Port": port,
        "Check": {"TCP": format!("127.0.0.1:{port}"), "Interval": "200ms", "Timeout": "1s"}});
    assert_eq!(
        put(
            addr,
            "/v1/agent/service/register",
            body.to_string().as_bytes()
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get(addr, "/v1/agent/checks").await.json()["service:tcp"]["Status"],
        "passing"
    );
    // The server goes away: HTTP checks turn critical; then one with
    // DeregisterCriticalServiceAfter leaves the catalog by itself.
    let body = json!({"Name": "reaped", "Port": port, "Check": {"HTTP": format!("http://127.0.0.1:{port}/ok"),
        "Interval": "100ms", "Timeout": "500ms", "DeregisterCriticalServiceAfter": "300ms"}});
    assert_eq!(
        put(
            addr,
            "/v1/agent/service/register",
            body.to_string().as_bytes()
        )
        .await
        .status,
        200
    );
    server.abort();
    let _ = server.await;
    eventually("the HTTP check of api-ok turned critical", || async {
        get(addr, "/v1/agent/checks").await.json()["service:api-ok"]["Status"] == "critical"
    })
    .await;
    eventually("reaped deregistered itself", || async {
        get(addr, "/v1/agent/service/reaped").await.status == 404
    })
    .await;
    http.shutdown().await;
}

#[tokio::test]
async fn several_checks_aggregate_to_the_worst() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();
    let body = br#"{"Name":"db","Port":5432,"Check":{"TTL":"1m","Status":"passing"},
        "Checks":[{"TTL":"1m"},{"TTL":"1m","CheckID":"db-disk","Name":"disk"}]}"#;
    let reply = put(addr, "/v1/agent/service/register", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let checks = get(addr, "/v1/agent/checks").await.json();
    let ids: Vec<&String> = checks.as_object().unwrap().keys().collect();
    assert_eq!(ids, ["db-disk", "service:db:1", "service:db:2"], "{checks}");
    assert_eq!(checks["service:db:1"]["Status"], "passing");
    assert_eq!(checks["service:db:2"]["Status"], "critical");
    assert_eq!(checks["db-disk"]["Name"], "disk");
    let health = || async {
        let entries = get(addr, "/v1/health/service/db?passing").await.json();
        entries.as_array().unwrap().len()
    };
    assert_eq!(health().await, 0, "one check critical: not passing");
    for id in ["service:db:2", "db-disk"] {
        let reply = put(addr, &format!("/v1/agent/check/pass/{id}"), b"").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(health().await, 1);
    let entry = &get(addr, "/v1/health/service/db").await.json()[0];
    assert_eq!(
        entry["Checks"].as_array().unwrap().len(),
        4,
        "serfHealth + 3"
    );
    put(addr, "/v1/agent/check/warn/db-disk", b"").await;
    let instance = &a
        .catalog()
        .lookup_with("db", &grapevine::Query::default().include_unhealthy())[0];
    assert_eq!(instance.health, grapevine::Health::Warning);
    assert_eq!(
        get(addr, "/v1/health/state/warning").await.json()[0]["CheckID"],
        "db-disk"
    );
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
        "Name": "web", "Port": 1,
        "Meta": (0..100).map(|i| (format!("k{i}"), "v".to_string())).collect::<std::collections::BTreeMap<_, _>>(),
    })
    .to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("missing name", r#"{"Port":1}"#.into(), 400, "Missing service name"),
        ("port as string", r#"{"Name":"web","Port":"80"}"#.into(), 400, "Port"),
        ("port out of range", r#"{"Name":"web","Port":70000}"#.into(), 400, "Port"),
        ("tags not a list", r#"{"Name":"web","Port":1,"Tags":"v1"}"#.into(), 400, "Tags"),
        ("unknown field", r#"{"Name":"web","Prot":1}"#.into(), 400, "unknown field"),
        ("connect", r#"{"Name":"web","Connect":{"Native":true}}"#.into(), 400, "Connect"),
        ("bad name", r#"{"Name":"we b","Port":1}"#.into(), 400, "' '"),
        ("bad address", r#"{"Name":"web","Port":1,"Address":"x"}"#.into(), 400, "Address"),
        ("two kinds", r#"{"Name":"web","Check":{"TTL":"1s","TCP":"127.0.0.1:1","Interval":"1s"}}"#.into(), 400, "exactly one"),
        ("no kind", r#"{"Name":"web","Check":{"Name":"x"}}"#.into(), 400, "one of TTL, TCP or HTTP"),
        ("script", r#"{"Name":"web","Check":{"Args":["/bin/true"],"Interval":"1s"}}"#.into(), 400, "Args checks are not supported"),
        ("tcp without interval", r#"{"Name":"web","Check":{"TCP":"127.0.0.1:1"}}"#.into(), 400, "Interval is required"),
        ("https", r#"{"Name":"web","Check":{"HTTP":"https://x/","Interval":"1s"}}"#.into(), 400, "https"),
        ("post", r#"{"Name":"web","Check":{"HTTP":"http://127.0.0.1/","Method":"POST","Interval":"1s"}}"#.into(), 400, "Method"),
        ("bad ttl", r#"{"Name":"web","Check":{"TTL":"soon"}}"#.into(), 400, "TTL"),
        ("ttl too short", r#"{"Name":"web","Check":{"TTL":"1ms"}}"#.into(), 400, "between"),
        ("bad status", r#"{"Name":"web","Check":{"TTL":"1s","Status":"great"}}"#.into(), 400, "status"),
        ("same check id", r#"{"Name":"web","Checks":[{"TTL":"1s","CheckID":"x"},{"TTL":"2s","CheckID":"x"}]}"#.into(), 400, "same CheckID"),
        ("too much meta", huge_meta, 400, "meta"),
        ("not JSON", "name=web".into(), 400, "Request decode failed"),
        ("not an object", "[1]".into(), 400, "JSON object"),
        ("empty body", String::new(), 400, "JSON body is required"),
        (
            "oversized body",
            format!(r#"{{"Name":"web","Port":1,"Tags":["{}"]}}"#, "x".repeat(20_000)),
            413,
            "too large",
        ),
    ];
    for (what, body, status, needle) in cases {
        let reply = put(addr, "/v1/agent/service/register", body.as_bytes()).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        consul_headers(&reply);
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
    consul_headers(&reply);
    let reply = get(addr, "/v1/nothing").await;
    assert_eq!(reply.status, 404);
    consul_headers(&reply);
    assert!(reply.error().contains("no such endpoint"));
    // Bad query parameters.
    for path in [
        "/v1/health/service/web?tags=v1",
        "/v1/health/service/web?passing=maybe",
        "/v1/health/service/web?index=-1",
        "/v1/health/service/web?index=1&wait=forever",
        "/v1/health/service/bad%20name",
        "/v1/catalog/services?wait=10x",
        "/v1/catalog/services?ns=team",
        "/metrics?x=1",
        "/v1/agent/members?index=x",
        "/v1/agent/members?wan",
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
async fn kv_answers_as_consul() {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();

    let reply = put(addr, "/v1/kv/prod/orders/max_conn", b"100").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!(true));
    consul_headers(&reply);
    put(addr, "/v1/kv/prod/orders/limits", b"[10,20]").await;
    put(addr, "/v1/kv/prod/ordersx", b"x").await;
    assert_eq!(
        put(addr, "/v1/kv/toplevel", b"one segment").await.json(),
        json!(true)
    );
    assert_eq!(
        put(addr, "/v1/kv/prod/blob", &[0xff, 0x00, 0xfe])
            .await
            .status,
        200
    );
    assert_eq!(put(addr, "/v1/kv/prod/empty", b"").await.status, 200);

    let reply = get(addr, "/v1/kv/prod/orders/max_conn").await;
    assert_eq!(reply.status, 200);
    let entries = reply.json();
    assert_eq!(entries.as_array().unwrap().len(), 1);
    let entry = &entries[0];
    assert_eq!(entry["Key"], "prod/orders/max_conn");
    assert_eq!(entry["Value"], b64(b"100"));
    assert_eq!(entry["Flags"], 0);
    assert_eq!(entry["LockIndex"], 0);
    assert_eq!(entry["CreateIndex"], 1);
    assert_eq!(entry["ModifyIndex"], 1);
    assert!(reply.index() >= 1);
    assert_eq!(
        get(addr, "/v1/kv/prod/blob").await.json()[0]["Value"],
        b64(&[0xff, 0x00, 0xfe])
    );
    assert_eq!(
        get(addr, "/v1/kv/prod/empty").await.json()[0]["Value"],
        Value::Null
    );
    // A rewrite keeps CreateIndex and moves ModifyIndex.
    put(addr, "/v1/kv/prod/orders/max_conn", b"200").await;
    let entry = &get(addr, "/v1/kv/prod/orders/max_conn").await.json()[0];
    assert_eq!(
        (entry["CreateIndex"].clone(), entry["ModifyIndex"].clone()),
        (json!(1), json!(7))
    );

    let raw = get(addr, "/v1/kv/prod/orders/max_conn?raw").await;
    assert_eq!(raw.body, b"200");
    consul_headers(&raw);
    // Plain-string prefixes, as Consul: `prod/orders` also lists `prod/ordersx`.
    let listed = get(addr, "/v1/kv/prod/orders?recurse").await.json();
    let keys: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["prod/orders/limits", "prod/orders/max_conn", "prod/ordersx"]
    );
    let keys = get(addr, "/v1/kv/prod/?keys&separator=/").await.json();
    assert_eq!(
        keys,
        json!(["prod/blob", "prod/empty", "prod/orders/", "prod/ordersx"])
    );
    let all = get(addr, "/v1/kv/?keys").await.json();
    assert_eq!(all.as_array().unwrap().len(), 6);
    assert_eq!(
        get(addr, "/v1/kv?recurse")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        6
    );

    let absent = get(addr, "/v1/kv/prod/orders/nothing").await;
    assert_eq!(absent.status, 404);
    assert!(absent.body.is_empty());
    consul_headers(&absent);
    assert_eq!(get(addr, "/v1/kv/staging?recurse").await.status, 404);
    assert_eq!(get(addr, "/v1/kv/staging?keys").await.status, 404);

    // Consensus-only operations are refused, saying why.
    for path in [
        "/v1/kv/prod/orders/max_conn?cas=1",
        "/v1/kv/prod/orders/max_conn?acquire=abc",
        "/v1/kv/prod/orders/max_conn?release=abc",
    ] {
        let reply = put(addr, path, b"1").await;
        assert_eq!(reply.status, 400, "{path}");
        assert!(
            reply.error().contains("consensus"),
            "{path}: {}",
            reply.error()
        );
    }
    let reply = request(addr, "DELETE", "/v1/kv/prod/orders/max_conn?cas=3", b"").await;
    assert!(reply.error().contains("consensus"));
    let cases: Vec<(&str, &str, String, &[u8], u16)> = vec![
        ("bad char", "PUT", "/v1/kv/prod/a%20b".into(), b"1", 400),
        ("empty segment", "GET", "/v1/kv/prod//x".into(), b"", 400),
        ("listing without a key", "GET", "/v1/kv".into(), b"", 400),
        ("put without a key", "PUT", "/v1/kv/".into(), b"1", 400),
        (
            "flags not a number",
            "PUT",
            "/v1/kv/prod/f?flags=x".into(),
            b"1",
            400,
        ),
        (
            "negative flags",
            "PUT",
            "/v1/kv/prod/f?flags=-1".into(),
            b"1",
            400,
        ),
        (
            "flags above 64 bits",
            "PUT",
            "/v1/kv/prod/f?flags=18446744073709551616".into(),
            b"1",
            400,
        ),
        ("delete without a key", "DELETE", "/v1/kv".into(), b"", 400),
        (
            "too long",
            "GET",
            format!("/v1/kv/{}", "k".repeat(600)),
            b"",
            400,
        ),
        (
            "too large",
            "PUT",
            "/v1/kv/prod/big".into(),
            &[b'x'; 70_000],
            413,
        ),
    ];
    for (what, method, path, body, status) in cases {
        let reply = request(addr, method, &path, body).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        consul_headers(&reply);
    }
    // ?flags is stored with the value and listed; a write without it stores 0, as Consul.
    let reply = put(addr, "/v1/kv/prod/f?flags=18446744073709551615", b"1").await;
    assert_eq!((reply.status, reply.json()), (200, json!(true)));
    let entry = get(addr, "/v1/kv/prod/f").await.json();
    assert_eq!(entry[0]["Flags"], json!(u64::MAX), "{entry}");
    let listed = get(addr, "/v1/kv/prod/f?recurse").await.json();
    assert_eq!(listed[0]["Flags"], json!(u64::MAX), "{listed}");
    assert_eq!(put(addr, "/v1/kv/prod/f?flags=7", b"2").await.status, 200);
    assert_eq!(get(addr, "/v1/kv/prod/f").await.json()[0]["Flags"], 7);
    assert_eq!(put(addr, "/v1/kv/prod/f", b"3").await.status, 200);
    assert_eq!(get(addr, "/v1/kv/prod/f").await.json()[0]["Flags"], 0);

    // DELETE answers true, absent keys included; ?recurse deletes a prefix.
    let reply = request(addr, "DELETE", "/v1/kv/prod/orders/max_conn", b"").await;
    assert_eq!((reply.status, reply.json()), (200, json!(true)));
    assert_eq!(get(addr, "/v1/kv/prod/orders/max_conn").await.status, 404);
    let reply = request(addr, "DELETE", "/v1/kv/prod/orders/max_conn", b"").await;
    assert_eq!((reply.status, reply.json()), (200, json!(true)));
    let reply = request(addr, "DELETE", "/v1/kv/prod/?recurse", b"").await;
    assert_eq!((reply.status, reply.json()), (200, json!(true)));
    assert_eq!(get(addr, "/v1/kv/?keys").await.json(), json!(["toplevel"]));
    http.shutdown().await;
}

#[tokio::test]
async fn blocking_queries_return_on_change_and_on_timeout() {
    let a = node("a", &[]).await;
    let http = serve(&a, HttpOptions::default()).await;
    let addr = http.local_addr();

    // health/service blocks until the service changes, not on unrelated changes.
    let index = get(addr, "/v1/health/service/web").await.index();
    let waiting = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let reply = get(
            addr,
            &format!("/v1/health/service/web?index={index}&wait=30s"),
        )
        .await;
        (reply, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"Name":"other","Port":1}"#,
    )
    .await;
    put(addr, "/v1/kv/unrelated", b"1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "woken by an unrelated change");
    put(
        addr,
        "/v1/agent/service/register",
        br#"{"Name":"web","Port":80}"#,
    )
    .await;
    let (reply, took) = waiting.await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(reply.index() > index);
    assert_eq!(reply.json()[0]["Service"]["Service"], "web");
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // Without a change, the wait ends with the same answer and an index at least as high.
    let index = reply.index();
    let started = tokio::time::Instant::now();
    let quiet = get(
        addr,
        &format!("/v1/catalog/service/web?index={index}&wait=400ms"),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(quiet.status, 200);
    assert!(quiet.index() >= index);
    // An index from the future (an earlier run) answers at once; wait is capped at 10 min.
    let started = tokio::time::Instant::now();
    let reply = get(addr, "/v1/catalog/services?index=999999&wait=10s").await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));

    // KV: a blocked read of a key wakes on its change, not on another key's.
    put(addr, "/v1/kv/app/flag", b"off").await;
    let first = get(addr, "/v1/kv/app/flag").await;
    let index = first.index();
    let waiting =
        tokio::spawn(
            async move { get(addr, &format!("/v1/kv/app/flag?index={index}&wait=30s")).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(addr, "/v1/kv/app/flagpole", b"1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "woken by another key");
    put(addr, "/v1/kv/app/flag", b"on").await;
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(reply.index() > index);
    assert_eq!(reply.json()[0]["Value"], "b24=");
    // A 404 blocks too: it wakes when the key appears.
    let absent = get(addr, "/v1/kv/app/later").await;
    assert_eq!(absent.status, 404);
    let index = absent.index();
    let waiting = tokio::spawn(async move {
        get(addr, &format!("/v1/kv/app/later?index={index}&wait=30s")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(addr, "/v1/kv/app/later", b"now").await;
    assert_eq!(waiting.await.unwrap().status, 200);
    // A recurse read times out quietly.
    let index = get(addr, "/v1/kv/app?recurse").await.index();
    let quiet = get(
        addr,
        &format!("/v1/kv/app?recurse&index={index}&wait=300ms"),
    )
    .await;
    assert_eq!((quiet.status, quiet.index()), (200, index));
    http.shutdown().await;
}

#[tokio::test]
async fn tokens_are_required_when_set() {
    let a = node("a", &[]).await;
    let options = HttpOptions {
        token: Some("s3cret".to_string()),
        ..HttpOptions::default()
    };
    let http = serve(&a, options).await;
    let addr = http.local_addr();
    let refused = get(addr, "/v1/agent/services").await;
    assert_eq!(refused.status, 403);
    consul_headers(&refused);
    assert!(refused.error().contains("token"));
    assert_eq!(
        get(addr, "/v1/agent/services?token=wrong").await.status,
        403
    );
    assert_eq!(get(addr, "/metrics").await.status, 403);
    assert_eq!(put(addr, "/v1/kv/x", b"1").await.status, 403);
    assert_eq!(a.config().get("x"), None);
    assert_eq!(
        get(addr, "/v1/agent/services?token=s3cret").await.status,
        200
    );
    for header in [
        ("X-Consul-Token", "s3cret"),
        ("Authorization", "Bearer s3cret"),
    ] {
        let reply =
            http_support::request_with(addr, "GET", "/v1/agent/services", &[header], b"").await;
        assert_eq!(reply.status, 200, "{header:?}");
    }
    for header in [
        ("X-Consul-Token", "s3cre"),
        ("Authorization", "Basic s3cret"),
    ] {
        let reply =
            http_support::request_with(addr, "GET", "/v1/agent/services", &[header], b"").await;
        assert_eq!(reply.status, 403, "{header:?}");
    }
    // The page itself loads (it holds no data); its reads need the token.
    assert_eq!(get(addr, "/").await.status, 200);
    assert_eq!(get(addr, "/v1/status").await.status, 403);
    let metrics = get(addr, "/metrics?token=s3cret").await.text();
    assert!(
        metrics.contains("grapevine_http_token_refused_total 7"),
        "{metrics}"
    );
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
    put(addr, "/v1/agent/check/pass/service:web", b"").await;
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
    value("grapevine_suspicion_notices_total");
    assert_eq!(value("grapevine_suspicions_shortened_total"), 0.0);
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
    assert!(
        text_a.contains("grapevine_rpc_ejections_total{service=\"adder\"} 0"),
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
