//! From a query packet to a response packet: sans-IO, so that tests and the fuzz target
//! drive it directly. hickory-proto parses and encodes; this file decides what to answer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::names::{self, Lookup, Parsed};
use super::stats::Counters;
use super::{DnsError, DnsOptions};
use crate::membership::Member;
use crate::node::Instance;
use crate::state::catalog::Health;

/// What the responder reads: the node's catalog and member list (a fixture in tests and
/// the fuzz target).
pub(crate) trait Directory {
    /// Instances of the service named exactly `service` on live nodes, whatever their
    /// health.
    fn instances(&self, service: &str) -> Vec<Instance>;
    /// Names of the services with an instance on a live node that equal `name` but for
    /// ASCII case.
    fn names_like(&self, name: &str) -> Vec<String>;
    /// The member list.
    fn members(&self) -> Vec<Member>;
}

/// How a packet came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A datagram: the answer must fit 512 bytes, or the EDNS0 size the client gave.
    Udp,
    /// A TCP stream: up to 65,535 bytes.
    Tcp,
}

/// Size of the DNS header.
const HEADER_LEN: usize = 12;
/// Smallest possible question (root name, type, class) and resource record.
const MIN_QUESTION: usize = 5;
const MIN_RECORD: usize = 11;
/// UDP answers without EDNS0 (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// Largest message over TCP (its length prefix is 16 bits).
pub(crate) const MAX_TCP_MESSAGE: usize = 65_535;
/// SOA timers of the domain (Consul's values); the negative TTL is the configured TTL.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// Answers queries for one domain from a [`Directory`].
pub(crate) struct Responder {
    domain: Name,
    datacenter: Option<String>,
    ttl: u32,
    node_ttl: u32,
    /// Per-service TTLs: (lowercase name or prefix, is a prefix, seconds), longest first.
    service_ttl: Vec<(String, bool, u32)>,
    udp_payload: u16,
    soa: Record,
    rng: Mutex<SmallRng>,
    pub(crate) counters: Arc<Counters>,
}

/// An answer before encoding: the message without its answer and additional records,
/// which are added as many as fit.
struct Reply {
    message: Message,
    qtype: RecordType,
    answers: Vec<Record>,
    /// For each answer, the additional record that goes with it (an SRV target's address).
    companion: Vec<Option<usize>>,
    additionals: Vec<Record>,
}

fn seconds(duration: std::time::Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(u32::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Responder {
    pub(crate) fn new(options: &DnsOptions, counters: Arc<Counters>) -> Result<Self, DnsError> {
        let bad = |reason: String| DnsError::Domain {
            domain: options.domain.clone(),
            reason,
        };
        let mut domain = Name::from_ascii(&options.domain).map_err(|e| bad(e.to_string()))?;
        domain.set_fqdn(true);
        if domain.is_root() {
            return Err(bad("the root cannot be the domain".into()));
        }
        if domain.len() > 200 {
            return Err(bad("longer than 200 bytes leaves no room for names".into()));
        }
        let domain = domain.to_lowercase();
        let label = |l: &str| Name::from_ascii(l).map_err(|e| bad(e.to_string()));
        let soa = Record::from_rdata(
            domain.clone(),
            seconds(options.ttl),
            RData::SOA(SOA::new(
                label("ns")?
                    .append_domain(&domain)
                    .map_err(|e| bad(e.to_string()))?,
                label("hostmaster")?
                    .append_domain(&domain)
                    .map_err(|e| bad(e.to_string()))?,
                1,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                seconds(options.ttl),
            )),
        );
        let mut service_ttl: Vec<(String, bool, u32)> = options
            .service_ttl
            .iter()
            .map(|(pattern, ttl)| {
                let pattern = pattern.to_ascii_lowercase();
                match pattern.strip_suffix('*') {
                    Some(prefix) => (prefix.to_string(), true, seconds(*ttl)),
                    None => (pattern, false, seconds(*ttl)),
                }
            })
            .collect();
        // Exact names first, then the longest prefix.
        service_ttl.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.len().cmp(&a.0.len())));
        let seed = match options.rng_seed {
            Some(seed) => seed,
            None => {
                let mut bytes = [0u8; 8];
                getrandom::getrandom(&mut bytes)
                    .map_err(|e| DnsError::Entropy(std::io::Error::other(e.to_string())))?;
                u64::from_le_bytes(bytes)
            }
        };
        Ok(Responder {
            domain,
            datacenter: options.datacenter.as_ref().map(|d| d.to_ascii_lowercase()),
            ttl: seconds(options.ttl),
            node_ttl: seconds(options.node_ttl),
            service_ttl,
            udp_payload: options.udp_payload.max(CLASSIC_UDP as u16),
            soa,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            counters,
        })
    }

    /// The response to `packet`, or `None` to drop it (malformed, or not a query).
    pub(crate) fn respond(
        &self,
        directory: &dyn Directory,
        packet: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let Some(request) = decode(packet) else {
            self.counters.malformed();
            return None;
        };
        let reply = self.answer(directory, &request);
        let limit = match transport {
            Transport::Tcp => MAX_TCP_MESSAGE,
            // RFC 6891: the client's size, at least 512, at most what we are willing to send.
            Transport::Udp => match &request.edns {
                Some(edns) => usize::from(edns.max_payload().min(self.udp_payload)),
                None => CLASSIC_UDP,
            }
            .max(CLASSIC_UDP),
        };
        let rcode = reply.message.metadata.response_code;
        let qtype = reply.qtype;
        let (bytes, truncated) = fit(reply, limit)?;
        self.counters.answered(qtype, rcode);
        if truncated {
            self.counters.truncated();
        }
        Some(bytes)
    }

    fn answer(&self, directory: &dyn Directory, request: &Message) -> Reply {
        let mut message = Message::new(
            request.metadata.id,
            MessageType::Response,
            request.metadata.op_code,
        );
        message.metadata.recursion_desired = request.metadata.recursion_desired;
        message.metadata.checking_disabled = request.metadata.checking_disabled;
        message.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(self.udp_payload).set_version(0);
            message.set_edns(edns);
        }
        let qtype = request
            .queries
            .first()
            .map_or(RecordType::Unknown(0), Query::query_type);
        let mut reply = Reply {
            message,
            qtype,
            answers: Vec::new(),
            companion: Vec::new(),
            additionals: Vec::new(),
        };
        let fail = |mut reply: Reply, rcode| {
            reply.message.metadata.response_code = rcode;
            reply
        };
        if request.metadata.op_code != OpCode::Query {
            return fail(reply, ResponseCode::NotImp);
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return fail(reply, ResponseCode::BADVERS);
        }
        let [query] = request.queries.as_slice() else {
            return fail(reply, ResponseCode::FormErr);
        };
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return fail(reply, ResponseCode::Refused);
        }
        let lookup = match names::parse(query.name(), &self.domain, self.datacenter.as_deref()) {
            Parsed::Outside => return fail(reply, ResponseCode::Refused),
            Parsed::Unknown => None,
            Parsed::Lookup(lookup) => Some(lookup),
        };
        reply.message.metadata.authoritative = true;
        let qname = query.name();
        let found = match lookup {
            None => false,
            Some(Lookup::Apex) => {
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    let mut soa = self.soa.clone();
                    soa.name = qname.clone();
                    reply.answers.push(soa);
                }
                true
            }
            Some(Lookup::Addr(addr)) => {
                self.address(&mut reply, qname, addr, self.ttl);
                true
            }
            Some(Lookup::Node(node)) => {
                let members = directory.members();
                let member = members
                    .iter()
                    .find(|m| m.status.is_active() && m.name.eq_ignore_ascii_case(node));
                match member {
                    Some(member) => {
                        self.address(&mut reply, qname, member.addr.ip(), self.node_ttl);
                        true
                    }
                    None => false,
                }
            }
            Some(Lookup::Service { name, tag }) => {
                self.service(directory, &mut reply, qname, name, tag)
            }
        };
        if !found {
            reply.message.metadata.response_code = ResponseCode::NXDomain;
        }
        reply.companion.resize(reply.answers.len(), None);
        if reply.answers.is_empty() {
            // Negative answers carry the SOA, whose minimum is the negative TTL (RFC 2308).
            reply.message.add_authority(self.soa.clone());
        }
        reply
    }

    /// An A or AAAA record of `addr` if the query type asks for its family.
    fn address(&self, reply: &mut Reply, name: &Name, addr: IpAddr, ttl: u32) {
        if let Some(record) = address_record(reply.qtype, name, addr, ttl) {
            reply.answers.push(record);
        }
    }

    /// Answers a service name; `false` if no instance on a live node carries the name.
    fn service(
        &self,
        directory: &dyn Directory,
        reply: &mut Reply,
        qname: &Name,
        name: &str,
        tag: Option<&str>,
    ) -> bool {
        let mut instances = directory.instances(name);
        if instances.is_empty() {
            // DNS names are case-insensitive; catalog names are not.
            for other in directory.names_like(name) {
                if other != name {
                    instances.extend(directory.instances(&other));
                }
            }
        }
        if let Some(tag) = tag {
            instances.retain(|i| i.tags.iter().any(|t| t.eq_ignore_ascii_case(tag)));
        }
        if instances.is_empty() {
            return false;
        }
        instances.retain(|i| i.health == Health::Passing);
        // Clients that take the first record spread their load.
        instances.shuffle(&mut *lock(&self.rng));
        let ttl = self.ttl_of(name);
        match reply.qtype {
            RecordType::SRV => self.srv_records(directory, reply, qname, &instances, ttl),
            _ => {
                let mut seen = std::collections::BTreeSet::new();
                for instance in &instances {
                    if seen.insert(instance.addr) {
                        self.address(reply, qname, instance.addr, ttl);
                    }
                }
            }
        }
        true
    }

    fn srv_records(
        &self,
        directory: &dyn Directory,
        reply: &mut Reply,
        qname: &Name,
        instances: &[Instance],
        ttl: u32,
    ) {
        let node_addrs: BTreeMap<String, IpAddr> = directory
            .members()
            .into_iter()
            .map(|m| (m.name, m.addr.ip()))
            .collect();
        // Targets already given an additional record, by name.
        let mut targets: BTreeMap<Name, usize> = BTreeMap::new();
        for instance in instances {
            let own_node = node_addrs.get(&instance.node) == Some(&instance.addr);
            let target = if own_node && names::is_plain_label(&instance.node) {
                self.name_under(instance.node.as_bytes(), "node")
            } else {
                // An address of its own (or a node name that is no DNS label): Consul's
                // `HEX.addr` target, which this server also answers.
                self.name_under(names::hex_addr(instance.addr).as_bytes(), "addr")
            };
            let Some(target) = target else { continue };
            let companion = match targets.get(&target) {
                Some(index) => Some(*index),
                None => address_record(RecordType::ANY, &target, instance.addr, self.node_ttl).map(
                    |record| {
                        reply.additionals.push(record);
                        targets.insert(target.clone(), reply.additionals.len() - 1);
                        reply.additionals.len() - 1
                    },
                ),
            };
            reply.answers.push(Record::from_rdata(
                qname.clone(),
                ttl,
                RData::SRV(SRV::new(1, 1, instance.port, target)),
            ));
            reply.companion.push(companion);
        }
    }

    /// `LABEL.KIND.DOMAIN`.
    fn name_under(&self, label: &[u8], kind: &str) -> Option<Name> {
        Name::from_labels([label, kind.as_bytes()])
            .ok()?
            .append_domain(&self.domain)
            .ok()
    }

    /// The TTL of a service's records: its own (exact name, then longest `prefix*`), or
    /// the default.
    fn ttl_of(&self, service: &str) -> u32 {
        let service = service.to_ascii_lowercase();
        self.service_ttl
            .iter()
            .find(|(pattern, prefix, _)| {
                if *prefix {
                    service.starts_with(pattern.as_str())
                } else {
                    service == *pattern
                }
            })
            .map_or(self.ttl, |(_, _, ttl)| *ttl)
    }
}

/// An A record for an IPv4 `addr` (if the query asks for A or ANY), AAAA for IPv6.
fn address_record(qtype: RecordType, name: &Name, addr: IpAddr, ttl: u32) -> Option<Record> {
    let rdata = match (qtype, addr) {
        (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(v4)),
        (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
        _ => return None,
    };
    Some(Record::from_rdata(name.clone(), ttl, rdata))
}

/// Decodes a query, refusing before any allocation what cannot be one: too short, a
/// response, more questions than one, more records than the bytes could hold.
fn decode(packet: &[u8]) -> Option<Message> {
    if packet.len() < HEADER_LEN || packet.len() > MAX_TCP_MESSAGE {
        return None;
    }
    let count = |at: usize| usize::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
    let is_response = packet[2] & 0x80 != 0;
    let (questions, records) = (count(4), count(6) + count(8) + count(10));
    let body = packet.len() - HEADER_LEN;
    if is_response || questions > 1 || questions * MIN_QUESTION + records * MIN_RECORD > body {
        return None;
    }
    let message = Message::from_vec(packet).ok()?;
    (message.metadata.message_type == MessageType::Query).then_some(message)
}

/// Encodes `reply` within `limit` bytes: every answer and as many additional records as
/// fit; if the answers alone do not fit, as many answers (with their additional records)
/// as fit, and TC set. Returns the bytes and whether it truncated.
fn fit(reply: Reply, limit: usize) -> Option<(Vec<u8>, bool)> {
    let Reply {
        mut message,
        answers,
        companion,
        additionals,
        ..
    } = reply;
    let mut encode = |answers: &[Record], additionals: Vec<Record>, truncated: bool| {
        message.answers = answers.to_vec();
        message.additionals = additionals;
        message.metadata.truncation = truncated;
        message.to_vec().ok()
    };
    let full = encode(&answers, additionals.clone(), false)?;
    if full.len() <= limit {
        return Some((full, false));
    }
    let bare = encode(&answers, Vec::new(), false)?;
    if bare.len() <= limit {
        // Every answer fits; additional records are a courtesy (no TC, RFC 2181 9).
        let count = largest(additionals.len(), |n| {
            encode(&answers, additionals[..n].to_vec(), false).filter(|b| b.len() <= limit)
        });
        return Some(count.unwrap_or((bare, false)));
    }
    let with_companions = |n: usize| {
        let mut wanted: Vec<usize> = companion[..n].iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted.into_iter().map(|i| additionals[i].clone()).collect()
    };
    let cut = largest(answers.len().saturating_sub(1), |n| {
        encode(&answers[..n], with_companions(n), true).filter(|b| b.len() <= limit)
    });
    match cut {
        Some(found) => Some(found),
        None => encode(&[], Vec::new(), true).map(|b| (b, true)),
    }
}

/// The encoding for the largest `n` in `0..=max` that `attempt` accepts (it accepts every
/// `n` below one it accepts), by bisection.
fn largest(
    max: usize,
    mut attempt: impl FnMut(usize) -> Option<Vec<u8>>,
) -> Option<(Vec<u8>, bool)> {
    let (mut lo, mut hi) = (0usize, max);
    let mut best = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match attempt(mid) {
            Some(bytes) => {
                best = Some(bytes);
                lo = mid + 1;
            }
            None if mid == 0 => break,
            None => hi = mid - 1,
        }
    }
    best.map(|bytes| {
        let truncated = bytes.get(2).is_some_and(|flags| flags & 0x02 != 0);
        (bytes, truncated)
    })
}

/// A fixed directory: for unit tests and the fuzz target.
pub(crate) mod fixture {
    use super::*;
    use crate::membership::MemberStatus;

    /// Instances and members held in memory.
    #[derive(Default)]
    pub(crate) struct Fixture {
        pub(crate) instances: Vec<Instance>,
        pub(crate) members: Vec<Member>,
    }

    impl Fixture {
        /// Nodes `n1`..`nN` at 127.0.0.1..N, each alive.
        pub(crate) fn with_nodes(count: u8) -> Self {
            let members = (1..=count)
                .map(|i| Member {
                    name: format!("n{i}"),
                    addr: ([127, 0, 0, i], 7946).into(),
                    status: MemberStatus::Alive,
                    generation: 1,
                })
                .collect();
            Fixture {
                instances: Vec::new(),
                members,
            }
        }

        /// Adds an instance of `service` on `node` (its address unless `addr`).
        pub(crate) fn add(
            &mut self,
            service: &str,
            node: &str,
            port: u16,
            tags: &[&str],
            health: Health,
            addr: Option<IpAddr>,
        ) {
            let member = self.members.iter().find(|m| m.name == node);
            let (node_addr, node_status) = member
                .map(|m| (m.addr.ip(), m.status))
                .unwrap_or((IpAddr::from([127, 0, 0, 1]), MemberStatus::Alive));
            self.instances.push(Instance {
                service: service.into(),
                id: format!("{service}-{node}-{port}"),
                node: node.into(),
                addr: addr.unwrap_or(node_addr),
                port,
                tags: tags.iter().map(|t| t.to_string()).collect(),
                meta: BTreeMap::new(),
                health,
                node_status,
            });
        }
    }

    impl Directory for Fixture {
        fn instances(&self, service: &str) -> Vec<Instance> {
            self.instances
                .iter()
                .filter(|i| i.service == service && i.node_status.is_active())
                .cloned()
                .collect()
        }

        fn names_like(&self, name: &str) -> Vec<String> {
            let names: std::collections::BTreeSet<String> = self
                .instances
                .iter()
                .filter(|i| i.node_status.is_active() && i.service.eq_ignore_ascii_case(name))
                .map(|i| i.service.clone())
                .collect();
            names.into_iter().collect()
        }

        fn members(&self) -> Vec<Member> {
            self.members.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::Fixture;
    use super::*;
    use hickory_proto::op::Edns;

    fn responder(options: DnsOptions) -> Responder {
        Responder::new(
            &DnsOptions {
                rng_seed: Some(7),
                ..options
            },
            Arc::new(Counters::default()),
        )
        .unwrap()
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            message.set_edns(e);
        }
        message.to_vec().unwrap()
    }

    fn ask(
        responder: &Responder,
        dir: &Fixture,
        name: &str,
        qtype: RecordType,
        transport: Transport,
        edns: Option<u16>,
    ) -> (Message, usize) {
        let bytes = responder
            .respond(dir, &query(name, qtype, edns), transport)
            .expect("an answer");
        (Message::from_vec(&bytes).unwrap(), bytes.len())
    }

    fn udp(responder: &Responder, dir: &Fixture, name: &str, qtype: RecordType) -> Message {
        ask(responder, dir, name, qtype, Transport::Udp, None).0
    }

    fn cluster() -> Fixture {
        let mut dir = Fixture::with_nodes(3);
        dir.add("web", "n1", 8080, &["v1"], Health::Passing, None);
        dir.add("web", "n2", 8080, &["v2"], Health::Passing, None);
        dir.add("web", "n3", 8080, &["v2"], Health::Critical, None);
        dir.add("db", "n1", 5432, &[], Health::Critical, None);
        dir.add(
            "api",
            "n2",
            9000,
            &[],
            Health::Passing,
            Some("10.0.0.9".parse().unwrap()),
        );
        dir
    }

    fn addresses(message: &Message) -> Vec<String> {
        let mut out: Vec<String> = message
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn service_a_records_are_the_passing_instances() {
        let (r, dir) = (responder(DnsOptions::default()), cluster());
        let answer = udp(&r, &dir, "web.service.consul.", RecordType::A);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative);
        assert!(!answer.metadata.recursion_available);
        assert_eq!(answer.metadata.id, 0x1234);
        assert_eq!(addresses(&answer), ["127.0.0.1", "127.0.0.2"]);
        assert!(answer.answers.iter().all(|r| r.ttl == 0));
        // Tags, both spellings; case does not matter.
        let tagged = udp(&r, &dir, "V2.Web.service.CONSUL.", RecordType::A);
        assert_eq!(addresses(&tagged), ["127.0.0.2"]);
        let rfc = udp(&r, &dir, "_web._v1.service.consul.", RecordType::A);
        assert_eq!(addresses(&rfc), ["127.0.0.1"]);
        // An instance's own address.
        let api = udp(&r, &dir, "api.service.consul.", RecordType::A);
        assert_eq!(addresses(&api), ["10.0.0.9"]);
        // No AAAA for IPv4 instances: NOERROR, no records, the SOA.
        let aaaa = udp(&r, &dir, "web.service.consul.", RecordType::AAAA);
        assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
        assert_eq!(aaaa.authorities.len(), 1);
    }

    #[test]
    fn negative_answers() {
        let (r, dir) = (responder(DnsOptions::default()), cluster());
        let unknown = udp(&r, &dir, "nope.service.consul.", RecordType::A);
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(unknown.authorities[0].record_type(), RecordType::SOA);
        // Known, nothing passing.
        let db = udp(&r, &dir, "db.service.consul.", RecordType::A);
        assert_eq!(db.metadata.response_code, ResponseCode::NoError);
        assert!(db.answers.is_empty());
        // A tag nobody carries.
        let tag = udp(&r, &dir, "v9.web.service.consul.", RecordType::A);
        assert_eq!(tag.metadata.response_code, ResponseCode::NXDomain);
        // A tag only failing instances carry (n3 has v2 and fails; n2 passes).
        let only_failing = udp(&r, &dir, "v2.web.service.consul.", RecordType::A);
        assert_eq!(addresses(&only_failing), ["127.0.0.2"]);
        let outside = udp(&r, &dir, "example.com.", RecordType::A);
        assert_eq!(outside.metadata.response_code, ResponseCode::Refused);
        assert!(outside.answers.is_empty());
        let odd = udp(&r, &dir, "what.consul.", RecordType::A);
        assert_eq!(odd.metadata.response_code, ResponseCode::NXDomain);
        let gone = udp(&r, &dir, "n9.node.consul.", RecordType::A);
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.counters.snapshot().queries_of("A", "NXDOMAIN"), 4);
        assert_eq!(r.counters.snapshot().queries_of("A", "REFUSED"), 1);
    }

    #[test]
    fn srv_records_point_at_nodes_with_addresses_alongside() {
        let (r, dir) = (responder(DnsOptions::default()), cluster());
        for name in ["web.service.consul.", "_web._tcp.service.consul."] {
            let answer = udp(&r, &dir, name, RecordType::SRV);
            let mut targets: Vec<(String, u16)> = answer
                .answers
                .iter()
                .map(|r| match &r.data {
                    RData::SRV(srv) => (srv.target.to_string(), srv.port),
                    other => panic!("{other:?}"),
                })
                .collect();
            targets.sort();
            assert_eq!(
                targets,
                [
                    ("n1.node.consul.".to_string(), 8080),
                    ("n2.node.consul.".to_string(), 8080)
                ]
            );
            let mut extra: Vec<String> = answer
                .additionals
                .iter()
                .map(|r| format!("{} {}", r.name, r.data))
                .collect();
            extra.sort();
            assert_eq!(extra.len(), 2, "{extra:?}");
            assert_eq!(
                extra,
                ["n1.node.consul. 127.0.0.1", "n2.node.consul. 127.0.0.2"]
            );
        }
        let api = udp(&r, &dir, "api.service.consul.", RecordType::SRV);
        let RData::SRV(srv) = &api.answers[0].data else {
            panic!()
        };
        assert_eq!(srv.target.to_string(), "0a000009.addr.consul.");
        let back = udp(&r, &dir, "0a000009.addr.consul.", RecordType::A);
        assert_eq!(addresses(&back), ["10.0.0.9"]);
    }

    #[test]
    fn node_names_and_the_apex() {
        let (r, dir) = (responder(DnsOptions::default()), cluster());
        let node = udp(&r, &dir, "N2.node.consul.", RecordType::A);
        assert_eq!(addresses(&node), ["127.0.0.2"]);
        let soa = udp(&r, &dir, "consul.", RecordType::SOA);
        assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn ttls_per_service_and_datacenter_label() {
        let mut service_ttl = BTreeMap::new();
        service_ttl.insert("web".to_string(), std::time::Duration::from_secs(30));
        service_ttl.insert("a*".to_string(), std::time::Duration::from_secs(5));
        let r = responder(DnsOptions {
            ttl: std::time::Duration::from_secs(1),
            datacenter: Some("DC1".into()),
            domain: "grapevine".into(),
            service_ttl,
            ..DnsOptions::default()
        });
        let dir = cluster();
        let web = udp(&r, &dir, "web.service.dc1.grapevine.", RecordType::A);
        assert!(web.answers.iter().all(|r| r.ttl == 30));
        let api = udp(&r, &dir, "api.service.grapevine.", RecordType::A);
        assert_eq!(api.answers[0].ttl, 5);
        let other = udp(&r, &dir, "consul.", RecordType::A);
        assert_eq!(other.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn answers_are_shuffled_per_query() {
        let mut dir = Fixture::with_nodes(10);
        for i in 1..=10 {
            dir.add("web", &format!("n{i}"), 80, &[], Health::Passing, None);
        }
        let r = responder(DnsOptions::default());
        let orders: std::collections::BTreeSet<Vec<String>> = (0..20)
            .map(|_| {
                udp(&r, &dir, "web.service.consul.", RecordType::A)
                    .answers
                    .iter()
                    .map(|r| format!("{:?}", r.data))
                    .collect()
            })
            .collect();
        assert!(orders.len() > 10, "only {} orders", orders.len());
        // Seeded: another responder with the same seed gives the same first answer.
        let first = |r: &Responder| udp(r, &dir, "web.service.consul.", RecordType::A).answers;
        let (a, b) = (
            responder(DnsOptions::default()),
            responder(DnsOptions::default()),
        );
        assert_eq!(first(&a), first(&b));
    }

    #[test]
    fn large_answers_are_cut_over_udp_and_whole_over_tcp() {
        let mut dir = Fixture::with_nodes(50);
        for i in 1..=50 {
            dir.add("web", &format!("n{i}"), 80, &[], Health::Passing, None);
        }
        let r = responder(DnsOptions::default());
        let name = "web.service.consul.";
        let (plain, len) = ask(&r, &dir, name, RecordType::A, Transport::Udp, None);
        assert!(plain.metadata.truncation);
        assert!(len <= 512 && !plain.answers.is_empty() && plain.answers.len() < 50);
        // EDNS0 4096: 50 A records fit.
        let (edns, _) = ask(&r, &dir, name, RecordType::A, Transport::Udp, Some(4096));
        assert!(!edns.metadata.truncation);
        assert_eq!(edns.answers.len(), 50);
        assert_eq!(edns.edns.as_ref().map(|e| e.max_payload()), Some(4096));
        // SRV with their addresses: past 1232 bytes, cut, each SRV kept with its address.
        let (srv, len) = ask(&r, &dir, name, RecordType::SRV, Transport::Udp, Some(1232));
        assert!(srv.metadata.truncation && len <= 1232);
        assert_eq!(srv.answers.len(), srv.additionals.len());
        let (tcp, _) = ask(&r, &dir, name, RecordType::SRV, Transport::Tcp, None);
        assert!(!tcp.metadata.truncation);
        assert_eq!((tcp.answers.len(), tcp.additionals.len()), (50, 50));
        assert_eq!(r.counters.snapshot().truncated, 2);
        // A client asking for less than 512 gets 512.
        let (small, len) = ask(&r, &dir, name, RecordType::A, Transport::Udp, Some(100));
        assert!(small.metadata.truncation && len <= 512 && len > 400);
    }

    #[test]
    fn bad_packets_are_dropped_or_refused() {
        let (r, dir) = (responder(DnsOptions::default()), cluster());
        for bad in [
            &b""[..],
            &[0u8; 11][..],
            // qdcount 65535 in a 12-byte packet.
            &[0, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0][..],
            // Ten thousand additional records claimed.
            &[0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0x27, 0x10, 0, 0, 1, 0, 1][..],
        ] {
            assert!(r.respond(&dir, bad, Transport::Udp).is_none());
        }
        // A response is not answered.
        let mut response = query("web.service.consul.", RecordType::A, None);
        response[2] |= 0x80;
        assert!(r.respond(&dir, &response, Transport::Udp).is_none());
        assert_eq!(r.counters.snapshot().malformed_dropped, 5);
        // No question: FORMERR. An update: NOTIMP. EDNS version 1: BADVERS.
        let empty = Message::new(9, MessageType::Query, OpCode::Query)
            .to_vec()
            .unwrap();
        let answer = Message::from_vec(&r.respond(&dir, &empty, Transport::Udp).unwrap()).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
        let mut update = Message::new(9, MessageType::Query, OpCode::Update);
        update.add_query(Query::query(
            Name::from_ascii("consul.").unwrap(),
            RecordType::SOA,
        ));
        let answer = Message::from_vec(
            &r.respond(&dir, &update.to_vec().unwrap(), Transport::Udp)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);
        let mut versioned =
            Message::from_vec(&query("consul.", RecordType::SOA, Some(1232))).unwrap();
        versioned.edns.as_mut().unwrap().set_version(1);
        let answer = Message::from_vec(
            &r.respond(&dir, &versioned.to_vec().unwrap(), Transport::Udp)
                .unwrap(),
        )
        .unwrap();
        // BADVERS and BADSIG share the code 16; hickory reads it back as BADSIG.
        assert_eq!(u16::from(answer.metadata.response_code), 16);
        assert_eq!(answer.edns.map(|e| e.version()), Some(0));
    }

    proptest::proptest! {
        /// Any bytes, and valid queries with bytes flipped: an answer within the
        /// transport's size, or a drop; never a panic.
        #[test]
        fn any_packet_is_answered_within_limits_or_dropped(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..4),
            qtype in proptest::sample::select(vec![RecordType::A, RecordType::SRV, RecordType::ANY]),
        ) {
            let mut dir = Fixture::with_nodes(30);
            for i in 1..=30 {
                dir.add("web", &format!("n{i}"), 80, &["v1"], Health::Passing, None);
            }
            let r = responder(DnsOptions::default());
            let mut packet = query("_web._v1.service.consul.", qtype, Some(700));
            for (at, byte) in flips {
                if let Some(b) = packet.get_mut(at) {
                    *b ^= byte;
                }
            }
            for bytes in [&noise, &packet] {
                for (transport, limit) in [(Transport::Udp, 4096), (Transport::Tcp, MAX_TCP_MESSAGE)] {
                    if let Some(reply) = r.respond(&dir, bytes, transport) {
                        proptest::prop_assert!(reply.len() <= limit);
                        proptest::prop_assert!(Message::from_vec(&reply).is_ok());
                    }
                }
            }
        }
    }

    #[test]
    fn a_bad_domain_is_refused() {
        for domain in [".", "", "a..b"] {
            let options = DnsOptions {
                domain: domain.into(),
                ..DnsOptions::default()
            };
            assert!(
                Responder::new(&options, Arc::new(Counters::default())).is_err(),
                "{domain:?}"
            );
        }
    }
}
