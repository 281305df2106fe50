//! The DNS interface against in-process nodes on loopback, asked by a DNS client library
//! nobody here wrote (hickory-resolver) and by raw packets where the resolver hides what is
//! tested (TC, REFUSED, malformed input).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use grapevine::dns::{DnsOptions, DnsServer};
use grapevine::http::HttpServer;
use grapevine::{Node, Profile, Service};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
mod http_support;

use common::WAIT;

/// Starts node `i` on 127.0.0.`i+1` (distinct addresses, so A records tell nodes apart).
async fn node_at(i: u8, seeds: &[SocketAddr]) -> Node {
    Node::builder(format!("node-{i}"))
        .bind(SocketAddr::from(([127, 0, 0, i + 1], 0)))
        .seeds(seeds.iter().copied())
        .profile(Profile::Local)
        .start()
        .await
        .expect("node starts")
}

async fn dns_for(node: Arc<Node>, options: DnsOptions) -> DnsServer {
    DnsServer::bind(node, "127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("DNS interface binds")
}

/// A resolver asking only `server`, over UDP with TCP fallback, caching nothing.
fn resolver(server: SocketAddr) -> TokioResolver {
    resolver_with(server, true)
}

fn resolver_with(server: SocketAddr, edns: bool) -> TokioResolver {
    let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let config = ResolverConfig::from_name_servers(vec![name_server]);
    let mut builder = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options = builder.options_mut();
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    options.attempts = 1;
    options.edns0 = edns;
    builder.build().expect("resolver builds")
}

/// The A records of `name`, sorted; empty on NOERROR without records; `None` on NXDOMAIN.
async fn a_records(resolver: &TokioResolver, name: &str) -> Option<Vec<IpAddr>> {
    match resolver.lookup(name, RecordType::A).await {
        Ok(lookup) => {
            let mut out: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect();
            out.sort();
            Some(out)
        }
        Err(error) if error.is_nx_domain() => None,
        Err(error) if error.is_no_records_found() => Some(Vec::new()),
        Err(error) => panic!("lookup of {name} failed: {error}"),
    }
}

/// Polls until the A records of `name` are `expected` (at most `WAIT`).
async fn wait_for_a(resolver: &TokioResolver, name: &str, expected: Option<Vec<IpAddr>>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = a_records(resolver, name).await;
        if found == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: {found:?}, waited for {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut message = Message::new(4242, MessageType::Query, OpCode::Query);
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        message.set_edns(e);
    }
    message.to_vec().unwrap()
}

/// One raw query over UDP; the reply's bytes.
async fn udp_raw(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buffer = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buffer)).await {
        Ok(Ok(len)) => Some(buffer[..len].to_vec()),
        _ => None,
    }
}

async fn udp_query(server: SocketAddr, name: &str, qtype: RecordType) -> (Message, usize) {
    let bytes = udp_raw(server, &query(name, qtype, None))
        .await
        .expect("a UDP answer");
    (Message::from_vec(&bytes).unwrap(), bytes.len())
}

/// One query over a TCP connection of its own.
async fn tcp_query(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let packet = query(name, qtype, None);
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    stream.write_all(&framed).await.unwrap();
    let read = async {
        let len = stream.read_u16().await.unwrap();
        let mut body = vec![0u8; usize::from(len)];
        stream.read_exact(&mut body).await.unwrap();
        body
    };
    let body = tokio::time::timeout(WAIT, read)
        .await
        .expect("a TCP answer");
    Message::from_vec(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_against_a_three_node_cluster() {
    let first = Arc::new(node_at(0, &[]).await);
    let seed = first.addr();
    let second = node_at(1, &[seed]).await;
    let third = node_at(2, &[seed]).await;
    for node in [&*first, &second, &third] {
        common::alive(node, 3).await;
    }
    let mut web = Service::new("web", "web-0", 8080);
    web.tags = vec!["v1".into()];
    let web0 = first.register(web).await.unwrap();
    let mut web = Service::new("web", "web-1", 8081);
    web.tags = vec!["v2".into()];
    second.register(web).await.unwrap();
    let db = third
        .register(Service::new("db", "db-2", 5432))
        .await
        .unwrap();
    db.fail().await.unwrap();

    let dns = dns_for(
        first.clone(),
        DnsOptions {
            rng_seed: Some(3),
            ..DnsOptions::default()
        },
    )
    .await;
    let resolver = resolver(dns.local_addr());
    wait_for_a(
        &resolver,
        "web.service.consul.",
        Some(vec![ip("127.0.0.1"), ip("127.0.0.2")]),
    )
    .await;
    assert_eq!(
        a_records(&resolver, "v2.web.service.consul.").await,
        Some(vec![ip("127.0.0.2")])
    );
    assert_eq!(
        a_records(&resolver, "_web._v1.service.consul.").await,
        Some(vec![ip("127.0.0.1")])
    );
    assert_eq!(
        a_records(&resolver, "node-2.node.consul.").await,
        Some(vec![ip("127.0.0.3")])
    );
    // Unknown service: NXDOMAIN. Known but failing: NOERROR, no records.
    assert_eq!(a_records(&resolver, "nope.service.consul.").await, None);
    wait_for_a(&resolver, "db.service.consul.", Some(Vec::new())).await;

    // SRV: port, target NODE.node.consul, the target's address in the additional section.
    let srv = resolver
        .lookup("_web._tcp.service.consul.", RecordType::SRV)
        .await
        .unwrap();
    let targets: BTreeSet<(String, u16)> = srv
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.target.to_string(), srv.port)),
            _ => None,
        })
        .collect();
    assert_eq!(
        targets,
        BTreeSet::from([
            ("node-0.node.consul.".to_string(), 8080),
            ("node-1.node.consul.".to_string(), 8081)
        ])
    );
    let glue: BTreeSet<String> = srv
        .additionals()
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert_eq!(
        glue,
        BTreeSet::from([
            "node-0.node.consul. 127.0.0.1".to_string(),
            "node-1.node.consul. 127.0.0.2".to_string()
        ])
    );

    // Outside the domain: REFUSED, never recursion.
    let (refused, _) = udp_query(dns.local_addr(), "example.com.", RecordType::A).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(!refused.metadata.recursion_available);

    // A crashed node's instance leaves the answers once the failure detector sees it.
    second.shutdown().await;
    drop(second);
    wait_for_a(
        &resolver,
        "web.service.consul.",
        Some(vec![ip("127.0.0.1")]),
    )
    .await;
    // A failing check takes the last one out: NOERROR, no records.
    web0.fail().await.unwrap();
    wait_for_a(&resolver, "web.service.consul.", Some(Vec::new())).await;

    // The counters reach `grapevine info` and /metrics.
    let stats = dns.stats();
    assert!(stats.queries_of("A", "NOERROR") >= 5, "{stats:?}");
    assert_eq!(stats.queries_of("A", "REFUSED"), 1);
    let info = grapevine::node::control::info(first.addr()).await.unwrap();
    assert!(info.extra["dns_queries"] >= 8, "{:?}", info.extra);
    assert_eq!(info.extra["dns_refused"], 1);
    let http = HttpServer::start(
        first.clone(),
        "127.0.0.1:0".parse().unwrap(),
        Default::default(),
    )
    .await
    .unwrap();
    let metrics = http_support::get(http.local_addr(), "/metrics")
        .await
        .text();
    assert!(
        metrics.contains("grapevine_dns_queries_total{type=\"A\",rcode=\"REFUSED\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("grapevine_dns_queries_total{type=\"SRV\",rcode=\"NOERROR\"} 1"));
    // Once the DNS interface stops, its counters leave both.
    dns.shutdown().await;
    let metrics = http_support::get(http.local_addr(), "/metrics")
        .await
        .text();
    assert!(!metrics.contains("grapevine_dns_"), "{metrics}");
    http.shutdown().await;
    third.shutdown().await;
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_instances_truncate_over_udp_and_come_whole_over_tcp() {
    let node = Arc::new(node_at(0, &[]).await);
    for i in 1..=50u8 {
        let mut service = Service::new("web", format!("web-{i}"), 8000 + u16::from(i));
        service.addr = Some(IpAddr::from([10, 0, 0, i]));
        node.register(service).await.unwrap();
    }
    let dns = dns_for(node.clone(), DnsOptions::default()).await;
    let server = dns.local_addr();
    let resolver = resolver(server);
    let all: Vec<IpAddr> = (1..=50u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
    // With EDNS0 the 50 A records fit one datagram; without, the resolver is told TC and
    // asks again over TCP: the whole set either way.
    wait_for_a(&resolver, "web.service.consul.", Some(all.clone())).await;
    let before = dns.stats();
    let plain = resolver_with(server, false);
    assert_eq!(a_records(&plain, "web.service.consul.").await, Some(all));
    let after = dns.stats();
    assert_eq!(after.truncated, before.truncated + 1);
    assert_eq!(after.tcp_accepted, before.tcp_accepted + 1);

    // Without EDNS: at most 512 bytes, TC set, a part of the set.
    let (cut, len) = udp_query(server, "web.service.consul.", RecordType::A).await;
    assert!(cut.metadata.truncation, "{cut:?}");
    assert!(len <= 512);
    assert!(!cut.answers.is_empty() && cut.answers.len() < 50);
    // EDNS0 sizes are honoured: 4,096 bytes hold every A record, 1,232 not every SRV.
    let bytes = udp_raw(
        server,
        &query("web.service.consul.", RecordType::A, Some(4096)),
    )
    .await
    .unwrap();
    let whole = Message::from_vec(&bytes).unwrap();
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 50);
    let bytes = udp_raw(
        server,
        &query("web.service.consul.", RecordType::SRV, Some(1232)),
    )
    .await
    .unwrap();
    assert!(bytes.len() <= 1232);
    assert!(Message::from_vec(&bytes).unwrap().metadata.truncation);
    // TCP gets the whole set: 50 SRV records and 50 addresses.
    let tcp = tcp_query(server, "web.service.consul.", RecordType::SRV).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 50);
    assert_eq!(tcp.additionals.len(), 50);
    assert_eq!(dns.stats().truncated, 3);
    dns.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_and_bad_packets_are_counted() {
    let node = Arc::new(node_at(0, &[]).await);
    node.register(Service::new("web", "web-1", 80))
        .await
        .unwrap();
    let dns = dns_for(
        node.clone(),
        DnsOptions {
            max_tcp_connections: 2,
            tcp_idle_timeout: Duration::from_millis(300),
            ..DnsOptions::default()
        },
    )
    .await;
    let server = dns.local_addr();
    // Garbage over UDP: no answer, counted; the server still answers after.
    let no_question = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for garbage in [&b"\x00"[..], &[0xff; 40][..], &no_question[..]] {
        assert!(udp_raw(server, garbage).await.is_none());
    }
    let (ok, _) = udp_query(server, "web.service.consul.", RecordType::A).await;
    assert_eq!(ok.answers.len(), 1);
    // Catalog names are case-sensitive, DNS names are not.
    node.register(Service::new("Mixed", "mixed-1", 81))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (mixed, _) = udp_query(server, "mIXED.service.consul.", RecordType::A).await;
        if mixed.answers.len() == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{mixed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dns.stats().malformed_dropped, 3);

    // Two connections held open; the third is closed at once.
    let held_a = tokio::net::TcpStream::connect(server).await.unwrap();
    let held_b = tokio::net::TcpStream::connect(server).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while dns.stats().tcp_open < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let mut third = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, third.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(dns.stats().tcp_refused_busy, 1);
    // Idle connections are closed, and their slots free up.
    for mut held in [held_a, held_b] {
        let closed = tokio::time::timeout(WAIT, held.read(&mut byte)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    tokio::time::timeout(WAIT, async {
        while dns.stats().tcp_open > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(dns.stats().tcp_idle_closed, 2);
    let answer = tcp_query(server, "web.service.consul.", RecordType::A).await;
    assert_eq!(answer.answers.len(), 1);
    // A malformed message over TCP closes that connection.
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    stream.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let closed = tokio::time::timeout(WAIT, stream.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(dns.stats().malformed_dropped, 4);
    dns.shutdown().await;
    node.shutdown().await;
}
