//! Consul's agent, catalog, health and status endpoints, translated from the node's views.
//!
//! The translation: datacenter = the cluster label ([`super::HttpOptions::datacenter`]),
//! Consul node = member, a service's check id = `service:{id}` (`service:{id}:N` when it has
//! several), `serfHealth` = the member's liveness. Instances of members that are down or
//! have left answer no lookup (grapevine's rule), so a crashed node's services drop out of
//! every listing. Grapevine gossips one health per instance: checks of this agent's own
//! services are shown as registered; a remote instance shows one `service:{id}` check with
//! the health its node reported.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::api::{answer, block_catalog, body_bytes, check_service_name, settle};
use super::query::{parse_duration, Params};
use super::{lock, ApiError, AppState};
use crate::membership::{ForceLeave, Member, MemberStatus};
use crate::node::{Check, HttpCheck, Instance, Node, RecordIndexes, ServiceHandle};
use crate::state::catalog::{Health, Service};

type Shared = State<Arc<AppState>>;

/// Parameters every Consul endpoint accepts (`token` is read before any handler).
const GLOBAL: &[&str] = &[
    "dc",
    "stale",
    "consistent",
    "cached",
    "pretty",
    "ns",
    "partition",
];
/// Shortest and longest check period accepted at registration.
const CHECK_PERIOD: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(86_400));
/// Checks per service at most.
const MAX_CHECKS: usize = 32;

/// Parses a Consul endpoint's query: its own parameters, the global ones, and (for reads)
/// `index` and `wait`. `?dc` must name this datacenter; `?stale` and `?consistent` are
/// accepted (every read is served from this agent's view) but not together, as Consul.
pub(crate) fn params(
    state: &AppState,
    query: Option<&str>,
    own: &[&str],
    blocking: bool,
) -> Result<Params, ApiError> {
    let mut allowed: Vec<&str> = GLOBAL.to_vec();
    allowed.extend_from_slice(own);
    if blocking {
        allowed.extend_from_slice(&["index", "wait"]);
    }
    let params = Params::parse(query, &allowed)?;
    if let Some(dc) = params.string("dc") {
        if !dc.is_empty() && dc != state.options.datacenter {
            return Err(ApiError::bad_request(format!(
                "No path to datacenter {dc:?}: this agent serves datacenter {:?} only",
                state.options.datacenter
            )));
        }
    }
    let (stale, consistent) = (params.flag("stale")?, params.flag("consistent")?);
    params.flag("cached")?;
    if stale && consistent {
        return Err(ApiError::bad_request(
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    for scope in ["ns", "partition"] {
        if let Some(value) = params.string(scope) {
            if !(value.is_empty() || value == "default") {
                return Err(ApiError::bad_request(format!(
                    "{scope}={value:?}: namespaces and partitions are not supported; only \"default\""
                )));
            }
        }
    }
    Ok(params)
}

/// An empty `200 OK`, as Consul answers most writes.
fn ok_empty() -> Response {
    StatusCode::OK.into_response()
}

fn status_text(health: Health) -> &'static str {
    match health {
        Health::Passing => "passing",
        Health::Warning => "warning",
        Health::Critical => "critical",
    }
}

/// A stable UUID-shaped node id derived from the node name (Consul clients expect one).
fn node_id(name: &str) -> String {
    let hash = Sha256::digest(name.as_bytes());
    let hex: String = hash.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Consul's `Weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Weights {
    passing: i64,
    warning: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// A check of a service registered through this API.
#[derive(Debug, Clone)]
pub(crate) struct LocalCheck {
    /// Position in the service's checks (the node's check number).
    index: usize,
    id: String,
    name: String,
    notes: String,
    /// `ttl`, `tcp` or `http`.
    kind: &'static str,
    ttl: bool,
    /// Set by `check/update` and the `note` of `check/pass|warn|fail`.
    output: String,
    /// Consul's `HealthCheckDefinition`.
    definition: Value,
}

/// A service registered through this API: its handle and what Consul shows that the
/// catalog does not replicate.
#[derive(Debug)]
pub(crate) struct LocalService {
    handle: ServiceHandle,
    weights: Weights,
    enable_tag_override: bool,
    tagged_addresses: BTreeMap<String, Value>,
    checks: Vec<LocalCheck>,
    /// Deregisters the service after its check has been critical this long.
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for LocalService {
    fn drop(&mut self) {
        if let Some(reaper) = self.reaper.take() {
            reaper.abort();
        }
    }
}

/// Consul's `Node` of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogNode {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

/// Consul's `AgentService` (also the `Service` of a health entry).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    port: u16,
    address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<String, Value>,
    weights: Weights,
    enable_tag_override: bool,
    datacenter: String,
    create_index: u64,
    modify_index: u64,
}

/// Consul's `HealthCheck`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheck {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: &'static str,
    notes: String,
    output: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    #[serde(rename = "Type")]
    kind: String,
    definition: Value,
    create_index: u64,
    modify_index: u64,
}

/// Consul's `ServiceEntry` of `/v1/health/service`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    node: CatalogNode,
    service: AgentService,
    checks: Vec<HealthCheck>,
}

/// Consul's `CatalogService` of `/v1/catalog/service`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogService {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    node_meta: BTreeMap<String, String>,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_address: String,
    service_tags: Vec<String>,
    service_meta: BTreeMap<String, String>,
    service_port: u16,
    service_weights: Weights,
    service_enable_tag_override: bool,
    service_tagged_addresses: BTreeMap<String, Value>,
    create_index: u64,
    modify_index: u64,
}

/// What a view shows of a service registered here beyond the catalog's record.
#[derive(Clone)]
struct Extras {
    weights: Weights,
    enable_tag_override: bool,
    tagged_addresses: BTreeMap<String, Value>,
    checks: Vec<LocalCheck>,
    /// Each check's status, by `LocalCheck::index`.
    statuses: Vec<Health>,
}

/// One read of the agent's view: the members by name, the live instances, and the extras
/// of the services registered here.
struct View {
    local: String,
    /// The catalog index this view was read at.
    index: u64,
    members: BTreeMap<String, Member>,
    instances: Vec<Instance>,
    indexes: BTreeMap<(String, String), RecordIndexes>,
    node_indexes: BTreeMap<String, RecordIndexes>,
    extras: BTreeMap<String, Extras>,
}

impl View {
    fn read(state: &AppState) -> View {
        let node = &state.node;
        let local = node.identity().name;
        let members: BTreeMap<String, Member> = node
            .members()
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        let catalog = node.catalog();
        let index = catalog.index();
        let (all, node_indexes) = catalog.all_instances_with_indexes();
        let mut indexes = BTreeMap::new();
        let mut instances = Vec::new();
        for (instance, record) in all {
            if instance.node_status.is_active() {
                indexes.insert((instance.node.clone(), instance.id.clone()), record);
                instances.push(instance);
            }
        }
        let extras = lock(&state.services)
            .iter()
            .map(|(id, s)| {
                let extras = Extras {
                    weights: s.weights,
                    enable_tag_override: s.enable_tag_override,
                    tagged_addresses: s.tagged_addresses.clone(),
                    checks: s.checks.clone(),
                    statuses: s.handle.check_statuses(),
                };
                (id.clone(), extras)
            })
            .collect();
        View {
            local,
            index,
            members,
            instances,
            indexes,
            node_indexes,
            extras,
        }
    }

    /// Consul's catalog node of `member`, with this agent's indexes of it.
    fn catalog_node(&self, state: &AppState, member: &Member) -> CatalogNode {
        let indexes = self.node_indexes(member);
        let ip = member.addr.ip().to_string();
        let mut tagged = BTreeMap::new();
        let family = if member.addr.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        for kind in ["lan", "wan"] {
            tagged.insert(kind.to_string(), ip.clone());
            tagged.insert(format!("{kind}_{family}"), ip.clone());
        }
        CatalogNode {
            id: node_id(&member.name),
            node: member.name.clone(),
            address: ip,
            datacenter: state.options.datacenter.clone(),
            tagged_addresses: tagged,
            meta: BTreeMap::new(),
            create_index: indexes.create,
            modify_index: indexes.modify,
        }
    }

    /// This agent's indexes of a member (the catalog index when it is not in the catalog
    /// view yet: the member list is published just after it).
    fn node_indexes(&self, member: &Member) -> RecordIndexes {
        self.node_indexes
            .get(&member.name)
            .copied()
            .unwrap_or(RecordIndexes {
                create: self.index,
                modify: self.index,
                health: self.index,
            })
    }

    /// This agent's indexes of an instance.
    fn indexes(&self, instance: &Instance) -> RecordIndexes {
        self.indexes
            .get(&(instance.node.clone(), instance.id.clone()))
            .copied()
            .unwrap_or_default()
    }

    fn extras(&self, instance: &Instance) -> Option<&Extras> {
        (instance.node == self.local)
            .then(|| self.extras.get(&instance.id))
            .flatten()
    }

    fn service(&self, state: &AppState, instance: &Instance) -> AgentService {
        let extras = self.extras(instance);
        let indexes = self.indexes(instance);
        AgentService {
            id: instance.id.clone(),
            service: instance.service.clone(),
            tags: instance.tags.clone(),
            meta: instance.meta.clone(),
            port: instance.port,
            address: instance.addr.to_string(),
            tagged_addresses: extras
                .map(|e| e.tagged_addresses.clone())
                .unwrap_or_default(),
            weights: extras.map(|e| e.weights).unwrap_or_default(),
            enable_tag_override: extras.is_some_and(|e| e.enable_tag_override),
            datacenter: state.options.datacenter.clone(),
            create_index: indexes.create,
            modify_index: indexes.modify,
        }
    }

    /// The service checks of an instance (not `serfHealth`).
    fn checks(&self, instance: &Instance) -> Vec<HealthCheck> {
        let indexes = self.indexes(instance);
        let check = |status: Health,
                     id: String,
                     name: String,
                     notes: String,
                     output: String,
                     kind: &str,
                     definition: Value| HealthCheck {
            node: instance.node.clone(),
            check_id: id,
            name,
            status: status_text(status),
            notes,
            output,
            service_id: instance.id.clone(),
            service_name: instance.service.clone(),
            service_tags: instance.tags.clone(),
            kind: kind.to_string(),
            definition,
            create_index: indexes.create,
            modify_index: indexes.health,
        };
        match self.extras(instance) {
            Some(extras) => extras
                .checks
                .iter()
                .map(|c| {
                    check(
                        extras
                            .statuses
                            .get(c.index)
                            .copied()
                            .unwrap_or(instance.health),
                        c.id.clone(),
                        c.name.clone(),
                        c.notes.clone(),
                        c.output.clone(),
                        c.kind,
                        c.definition.clone(),
                    )
                })
                .collect(),
            None => vec![check(
                instance.health,
                format!("service:{}", instance.id),
                format!("Service '{}' check", instance.service),
                format!(
                    "the health node {} reports for this instance (grapevine gossips one \
                     health per instance)",
                    instance.node
                ),
                String::new(),
                "",
                Value::Object(Map::new()),
            )],
        }
    }

    fn serf_check(&self, member: &Member) -> HealthCheck {
        let alive = member.status.is_active();
        let indexes = self.node_indexes(member);
        HealthCheck {
            node: member.name.clone(),
            check_id: "serfHealth".to_string(),
            name: "Serf Health Status".to_string(),
            status: if alive { "passing" } else { "critical" },
            notes: String::new(),
            output: if alive {
                "Agent alive and reachable"
            } else {
                "Agent not live or unreachable"
            }
            .to_string(),
            service_id: String::new(),
            service_name: String::new(),
            service_tags: Vec::new(),
            kind: String::new(),
            definition: Value::Object(Map::new()),
            create_index: indexes.create,
            modify_index: indexes.health,
        }
    }

    fn entry(&self, state: &AppState, instance: &Instance) -> Option<ServiceEntry> {
        let member = self.members.get(&instance.node)?;
        let mut checks = vec![self.serf_check(member)];
        checks.extend(self.checks(instance));
        Some(ServiceEntry {
            node: self.catalog_node(state, member),
            service: self.service(state, instance),
            checks,
        })
    }

    /// Members Consul's catalog would list: all but those that left.
    fn nodes(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.status != MemberStatus::Left)
    }
}

/// Puts the entries of the node named by `?near` first (`_agent`: this agent); grapevine
/// has no network coordinates, so the rest keep their order.
fn near<T>(params: &Params, local: &str, items: &mut [T], node: impl Fn(&T) -> &str) {
    if let Some(near) = params.string("near") {
        let name = if near == "_agent" { local } else { near };
        items.sort_by_key(|item| node(item) != name);
    }
}

/// Whether every node passes the `?node-meta=key:value` filters (repeatable) of Consul's
/// catalog and health reads: grapevine nodes carry no node meta (`Meta` is `{}`), so a
/// filter naming any key matches no node.
fn node_meta_matches(params: &Params) -> bool {
    params.all("node-meta").iter().all(|f| f.is_empty())
}

fn tags_match(params: &Params, instance: &Instance) -> bool {
    params
        .all("tag")
        .iter()
        .all(|tag| instance.tags.contains(tag))
}

// ---- status ----

pub(crate) async fn status_leader(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], false)?;
    let index = state.node.catalog().index();
    Ok(answer(&params, index, &state.node.addr().to_string()))
}

pub(crate) async fn status_peers(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], false)?;
    let index = state.node.catalog().index();
    Ok(answer(&params, index, &[state.node.addr().to_string()]))
}

// ---- agent ----

/// Consul's `AgentMember`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentMember {
    name: String,
    addr: String,
    port: u16,
    tags: BTreeMap<String, String>,
    /// Serf's: 1 alive, 3 left, 4 failed (a suspect member is still alive).
    status: u8,
    protocol_min: u8,
    protocol_max: u8,
    protocol_cur: u8,
    delegate_min: u8,
    delegate_max: u8,
    delegate_cur: u8,
}

fn agent_member(state: &AppState, member: &Member) -> AgentMember {
    let status = match member.status {
        MemberStatus::Alive | MemberStatus::Suspect => 1,
        MemberStatus::Left => 3,
        MemberStatus::Down => 4,
    };
    let mut tags = BTreeMap::new();
    tags.insert("dc".to_string(), state.options.datacenter.clone());
    tags.insert("role".to_string(), "node".to_string());
    tags.insert("build".to_string(), env!("CARGO_PKG_VERSION").to_string());
    tags.insert("id".to_string(), node_id(&member.name));
    tags.insert(
        "grapevine_generation".to_string(),
        member.generation.to_string(),
    );
    AgentMember {
        name: member.name.clone(),
        addr: member.addr.ip().to_string(),
        port: member.addr.port(),
        tags,
        status,
        protocol_min: 1,
        protocol_max: 5,
        protocol_cur: 2,
        delegate_min: 2,
        delegate_max: 5,
        delegate_cur: 4,
    }
}

pub(crate) async fn members(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["wan", "segment"], true)?;
    if params.flag("wan")? {
        return Err(ApiError::bad_request(
            "WAN members can only be requested from servers; this agent has none",
        ));
    }
    let (index, members) = block_catalog(&state, &params, |node: &Node| {
        node.members()
            .iter()
            .map(|m| agent_member(&state, m))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(answer(&params, index, &members))
}

pub(crate) async fn agent_self(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], false)?;
    let identity = state.node.identity();
    let me = Member {
        name: identity.name.clone(),
        addr: identity.addr,
        status: MemberStatus::Alive,
        generation: identity.generation,
    };
    let body = serde_json::json!({
        "Config": {
            "Datacenter": state.options.datacenter,
            "PrimaryDatacenter": state.options.datacenter,
            "NodeName": identity.name,
            "NodeID": node_id(&identity.name),
            "Server": false,
            "Revision": "",
            "Version": env!("CARGO_PKG_VERSION"),
        },
        "Member": agent_member(&state, &me),
        "Meta": {},
        "Stats": state.node.stats(),
        "Grapevine": {
            "name": identity.name,
            "addr": identity.addr,
            "generation": identity.generation,
            "version": env!("CARGO_PKG_VERSION"),
            "catalog_index": state.node.catalog().index(),
            "config_seq": state.node.config().current_seq(),
        },
    });
    Ok(answer(&params, state.node.catalog().index(), &body))
}

/// How long `PUT /v1/agent/join` waits for the address to answer and show up as a member.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Joins the cluster through `address` (`host:port`, `ip:port`, or a bare host/IP on this
/// agent's own gossip port, as Consul defaults to its own port), waiting at most
/// [`JOIN_WAIT`] for it to answer.
pub(crate) async fn join(
    State(state): Shared,
    Path(address): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["wan"], false)?;
    if params.flag("wan")? {
        return Err(ApiError::bad_request(
            "?wan: this agent has no WAN pool (one datacenter only); join without ?wan",
        ));
    }
    let failed = |why: String| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("1 error occurred:\n\t* Failed to join {address}: {why}\n\n"),
        )
    };
    let addr = resolve_join_address(&address, state.node.identity().addr.port())
        .await
        .map_err(failed)?;
    state
        .node
        .join(addr, JOIN_WAIT)
        .await
        .map_err(|error| failed(format!("{addr}: {error}")))?;
    Ok(ok_empty())
}

/// The socket address `PUT /v1/agent/join/{address}` names; a name is resolved within
/// [`JOIN_WAIT`].
async fn resolve_join_address(address: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = address.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let target = if address
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        address.to_string()
    } else {
        format!("{address}:{default_port}")
    };
    match tokio::time::timeout(JOIN_WAIT, tokio::net::lookup_host(target)).await {
        Err(_) => Err(format!("resolving the name timed out after {JOIN_WAIT:?}")),
        Ok(Err(error)) => Err(format!("cannot resolve the name: {error}")),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| "the name resolves to no address".to_string()),
    }
}

pub(crate) async fn leave(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    params(&state, query.as_deref(), &[], false)?;
    state.node.leave().await?;
    state.left.cancel();
    Ok(ok_empty())
}

/// Consul's `force-leave`: a failed (suspect or down) member becomes `left` on every live
/// node, so its instances leave lookups; `?prune` also drops it from this agent's member
/// list. A live member stays (200, as Consul, which leaves an alive and reachable member
/// in place).
pub(crate) async fn force_leave(
    State(state): Shared,
    Path(node): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["prune", "wan"], false)?;
    if params.flag("wan")? {
        return Err(ApiError::bad_request(
            "?wan: this agent has no WAN pool (one datacenter only); force-leave without ?wan",
        ));
    }
    let prune = params.flag("prune")?;
    match state.node.force_leave(&node, prune).await? {
        ForceLeave::NotFound => Err(ApiError::not_found(format!(
            "agent: No node found with name '{node}'"
        ))),
        ForceLeave::Alive | ForceLeave::Left | ForceLeave::Pruned => Ok(ok_empty()),
    }
}

pub(crate) async fn agent_services(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], true)?;
    let (index, services) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        view.instances
            .iter()
            .filter(|i| i.node == view.local)
            .map(|i| (i.id.clone(), view.service(&state, i)))
            .collect::<BTreeMap<_, _>>()
    })
    .await?;
    Ok(answer(&params, index, &services))
}

pub(crate) async fn agent_service(
    State(state): Shared,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], true)?;
    let (index, service) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        view.instances
            .iter()
            .find(|i| i.node == view.local && i.id == id)
            .map(|i| view.service(&state, i))
    })
    .await?;
    match service {
        Some(service) => Ok(answer(&params, index, &service)),
        None => Err(ApiError::not_found(format!("unknown service ID: {id}")).with_index(index)),
    }
}

/// One local service's health as Consul's `agent/health/service` answers it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentServiceHealth {
    aggregated_status: &'static str,
    service: AgentService,
    checks: Vec<HealthCheck>,
}

/// The worst status of `checks` (passing when there are none), as Consul aggregates them.
fn aggregate(checks: &[HealthCheck]) -> &'static str {
    let rank = |s: &str| match s {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    };
    checks
        .iter()
        .map(|c| c.status)
        .max_by_key(|s| rank(s))
        .unwrap_or("passing")
}

/// Consul's status code for an aggregated status: 200 passing, 429 warning, 503 critical.
fn health_code(status: &str) -> StatusCode {
    match status {
        "passing" => StatusCode::OK,
        "warning" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The answer of `agent/health/service/...`: JSON, or with `?format=text` the aggregated
/// status alone, under the status's code either way.
fn health_answer<T: Serialize>(
    params: &Params,
    index: u64,
    status: &'static str,
    body: &T,
) -> Result<Response, ApiError> {
    let mut response = match params.string("format") {
        Some("text") => {
            let mut response = (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                status,
            )
                .into_response();
            response
                .headers_mut()
                .insert(super::INDEX_HEADER, HeaderValue::from(index.max(1)));
            response
        }
        None | Some("json") | Some("") => answer(params, index, body),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format={other:?}: give text or json"
            )))
        }
    };
    *response.status_mut() = health_code(status);
    Ok(response)
}

/// `GET /v1/agent/health/service/id/{id}`: a local service's aggregated health, as
/// Consul's agent answers load balancers.
pub(crate) async fn agent_health_by_id(
    State(state): Shared,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["format"], false)?;
    let view = View::read(&state);
    let Some(instance) = view
        .instances
        .iter()
        .find(|i| i.node == view.local && i.id == id)
    else {
        return Err(ApiError::not_found(format!("ServiceId {id} not found")));
    };
    let checks = view.checks(instance);
    let status = aggregate(&checks);
    let body = AgentServiceHealth {
        aggregated_status: status,
        service: view.service(&state, instance),
        checks,
    };
    health_answer(&params, view.index, status, &body)
}

/// `GET /v1/agent/health/service/name/{name}`: every local instance of a service with its
/// aggregated health; the code is the worst one's.
pub(crate) async fn agent_health_by_name(
    State(state): Shared,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["format"], false)?;
    check_service_name(&name)?;
    let view = View::read(&state);
    let all: Vec<AgentServiceHealth> = view
        .instances
        .iter()
        .filter(|i| i.node == view.local && i.service == name)
        .map(|i| {
            let checks = view.checks(i);
            AgentServiceHealth {
                aggregated_status: aggregate(&checks),
                service: view.service(&state, i),
                checks,
            }
        })
        .collect();
    if all.is_empty() {
        return Err(ApiError::not_found(format!("ServiceName {name} Not Found")));
    }
    let worst: Vec<HealthCheck> = all.iter().flat_map(|h| h.checks.clone()).collect();
    health_answer(&params, view.index, aggregate(&worst), &all)
}

pub(crate) async fn agent_checks(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], true)?;
    let (index, checks) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        view.instances
            .iter()
            .filter(|i| i.node == view.local)
            .flat_map(|i| view.checks(i))
            .map(|c| (c.check_id.clone(), c))
            .collect::<BTreeMap<_, _>>()
    })
    .await?;
    Ok(answer(&params, index, &checks))
}

// ---- registration ----

/// Consul decodes bodies case-insensitively (Go's `encoding/json`) and also takes
/// snake_case: `ID`, `id`, `Id` and `service_id`-style names all match.
fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The fields of a JSON object, by canonical name; nulls count as absent. Fields outside
/// `known` are refused with their name.
fn fields(
    value: Value,
    what: &str,
    known: &[&'static str],
) -> Result<BTreeMap<&'static str, Value>, ApiError> {
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request(format!(
            "Request decode failed: {what} must be a JSON object"
        )));
    };
    let mut out = BTreeMap::new();
    for (name, value) in object {
        let key = normalize(&name);
        let Some(canonical) = known.iter().find(|k| normalize(k) == key) else {
            return Err(ApiError::bad_request(format!(
                "Request decode failed: unknown field {name:?} in {what}"
            )));
        };
        if !value.is_null() {
            out.insert(*canonical, value);
        }
    }
    Ok(out)
}

fn string_field(
    fields: &BTreeMap<&'static str, Value>,
    name: &str,
) -> Result<Option<String>, ApiError> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(ApiError::bad_request(format!(
            "Request decode failed: {name} must be a string, not {other}"
        ))),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    fields: &BTreeMap<&'static str, Value>,
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    fields
        .get(name)
        .map(|value| {
            serde_json::from_value(value.clone()).map_err(|error| {
                ApiError::bad_request(format!(
                    "Request decode failed: {name} must be {what}: {error}"
                ))
            })
        })
        .transpose()
}

fn duration_field(
    fields: &BTreeMap<&'static str, Value>,
    name: &str,
) -> Result<Option<Duration>, ApiError> {
    let Some(text) = string_field(fields, name)? else {
        return Ok(None);
    };
    if text.is_empty() {
        return Ok(None);
    }
    let period = parse_duration(&text)
        .map_err(|error| ApiError::bad_request(format!("{name}={text:?}: {error}")))?;
    let (min, max) = CHECK_PERIOD;
    if period < min || period > max {
        return Err(ApiError::bad_request(format!(
            "{name}={text:?} must be between {min:?} and {max:?}"
        )));
    }
    Ok(Some(period))
}

/// Whether a field is absent or an "empty" value (`""`, `{}`, `[]`, `0`, `false`).
fn empty(fields: &BTreeMap<&'static str, Value>, name: &str) -> bool {
    match fields.get(name) {
        None => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::Bool(b)) => !b,
        Some(Value::Null) => true,
    }
}

const REGISTRATION_FIELDS: &[&str] = &[
    "ID",
    "Name",
    "Tags",
    "Address",
    "Port",
    "Meta",
    "Weights",
    "EnableTagOverride",
    "Check",
    "Checks",
    "TaggedAddresses",
    "Kind",
    "Proxy",
    "Connect",
    "SocketPath",
    "Namespace",
    "Partition",
    "Locality",
];

const CHECK_FIELDS: &[&str] = &[
    "CheckID",
    "ID",
    "Name",
    "Notes",
    "Status",
    "ServiceID",
    "TTL",
    "TCP",
    "HTTP",
    "Method",
    "Header",
    "Body",
    "Interval",
    "Timeout",
    "DeregisterCriticalServiceAfter",
    "TLSSkipVerify",
    "TLSServerName",
    "DisableRedirects",
    "SuccessBeforePassing",
    "FailuresBeforeCritical",
    "FailuresBeforeWarning",
    "OutputMaxSize",
    "Args",
    "ScriptArgs",
    "GRPC",
    "GRPCUseTLS",
    "DockerContainerID",
    "Shell",
    "AliasNode",
    "AliasService",
    "H2PING",
    "H2PingUseTLS",
    "UDP",
    "OSService",
    "TCPUseTLS",
    "Type",
];

/// Check kinds Consul has and this agent does not run.
const UNSUPPORTED_CHECKS: &[&str] = &[
    "Args",
    "ScriptArgs",
    "GRPC",
    "DockerContainerID",
    "Shell",
    "AliasNode",
    "AliasService",
    "H2PING",
    "UDP",
    "OSService",
];

/// A check as registered: what the node runs, and what Consul shows.
struct CheckDef {
    check: Check,
    local: LocalCheck,
    initial: Option<Health>,
    deregister_after: Option<Duration>,
}

async fn check_definition(
    value: Value,
    service_id: &str,
    service_name: &str,
    number: Option<usize>,
) -> Result<CheckDef, ApiError> {
    let f = fields(value, "Check", CHECK_FIELDS)?;
    for kind in UNSUPPORTED_CHECKS {
        if !empty(&f, kind) {
            return Err(ApiError::bad_request(format!(
                "{kind} checks are not supported by this agent; use TTL, TCP or HTTP"
            )));
        }
    }
    for field in [
        "SuccessBeforePassing",
        "FailuresBeforeCritical",
        "FailuresBeforeWarning",
        "TCPUseTLS",
        "GRPCUseTLS",
        "H2PingUseTLS",
        "Body",
    ] {
        if !empty(&f, field) {
            return Err(ApiError::bad_request(format!(
                "check field {field} is not supported by this agent"
            )));
        }
    }
    if let Some(given) = string_field(&f, "ServiceID")? {
        if given != service_id {
            return Err(ApiError::bad_request(format!(
                "check ServiceID {given:?} differs from the service's ID {service_id:?}"
            )));
        }
    }
    let id = match string_field(&f, "CheckID")?.or(string_field(&f, "ID")?) {
        Some(id) if !id.is_empty() => id,
        _ => match number {
            Some(n) => format!("service:{service_id}:{n}"),
            None => format!("service:{service_id}"),
        },
    };
    if id.len() > 256 || id.contains('/') {
        return Err(ApiError::bad_request(format!(
            "check ID {id:?} must be at most 256 bytes without '/'"
        )));
    }
    let name = string_field(&f, "Name")?
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("Service '{service_name}' check"));
    let notes = string_field(&f, "Notes")?.unwrap_or_default();
    let initial = match string_field(&f, "Status")?.as_deref() {
        None | Some("") => None,
        Some("passing") => Some(Health::Passing),
        Some("warning") => Some(Health::Warning),
        Some("critical") => Some(Health::Critical),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid check status {other:?}: use passing, warning or critical"
            )))
        }
    };
    let deregister_after = duration_field(&f, "DeregisterCriticalServiceAfter")?;
    let interval = duration_field(&f, "Interval")?;
    let timeout = duration_field(&f, "Timeout")?;
    let ttl = duration_field(&f, "TTL")?;
    let tcp = string_field(&f, "TCP")?.filter(|t| !t.is_empty());
    let http = string_field(&f, "HTTP")?.filter(|t| !t.is_empty());
    let mut definition = Map::new();
    let need_interval = |kind: &str| {
        interval
            .ok_or_else(|| ApiError::bad_request(format!("Interval is required for {kind} checks")))
    };
    let (check, kind) = match (ttl, tcp, http) {
        (Some(ttl), None, None) => {
            definition.insert("TTL".into(), Value::String(format!("{ttl:?}")));
            (Check::ttl(ttl), "ttl")
        }
        (None, Some(tcp), None) => {
            let interval = need_interval("TCP")?;
            let timeout = timeout.unwrap_or(Duration::from_secs(10));
            let addr = resolve(&tcp).await?;
            definition.insert("TCP".into(), Value::String(tcp));
            (Check::tcp_to(addr, interval, timeout), "tcp")
        }
        (None, None, Some(url)) => {
            let interval = need_interval("HTTP")?;
            let timeout = timeout.unwrap_or(Duration::from_secs(10)).min(interval);
            if HttpCheck::parse_url(&url).is_none() {
                return Err(ApiError::bad_request(format!(
                    "HTTP check URL {url:?} is not supported: give http://host[:port]/path \
                     (https is not supported)"
                )));
            }
            match string_field(&f, "Method")?.as_deref() {
                None | Some("") | Some("GET") => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "HTTP check Method {other:?} is not supported; only GET"
                    )))
                }
            }
            let header: BTreeMap<String, Vec<String>> =
                decode(&f, "Header", "an object of string lists")?.unwrap_or_default();
            let mut headers = Vec::new();
            for (name, values) in &header {
                let valid = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && values.iter().all(|v| !v.contains(['\r', '\n']));
                if !valid {
                    return Err(ApiError::bad_request(format!(
                        "HTTP check header {name:?} is not a valid header"
                    )));
                }
                headers.extend(values.iter().map(|v| (name.clone(), v.clone())));
            }
            definition.insert("HTTP".into(), Value::String(url.clone()));
            definition.insert("Method".into(), Value::String("GET".into()));
            (
                Check::http(HttpCheck {
                    url,
                    headers,
                    interval,
                    timeout,
                }),
                "http",
            )
        }
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "a check needs one of TTL, TCP or HTTP",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "a check takes exactly one of TTL, TCP or HTTP",
            ))
        }
    };
    if let Some(interval) = interval {
        definition.insert("Interval".into(), Value::String(format!("{interval:?}")));
    }
    if let Some(timeout) = timeout {
        definition.insert("Timeout".into(), Value::String(format!("{timeout:?}")));
    }
    if let Some(after) = deregister_after {
        definition.insert(
            "DeregisterCriticalServiceAfter".into(),
            Value::String(format!("{after:?}")),
        );
    }
    Ok(CheckDef {
        check,
        local: LocalCheck {
            index: number.map_or(0, |n| n - 1),
            id,
            name,
            notes,
            kind,
            ttl: kind == "ttl",
            output: String::new(),
            definition: Value::Object(definition),
        },
        initial,
        deregister_after,
    })
}

/// `host:port` of a TCP check, resolved once at registration (bounded).
async fn resolve(target: &str) -> Result<SocketAddr, ApiError> {
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || {
        ApiError::bad_request(format!(
            "TCP check target {target:?} is not host:port or does not resolve"
        ))
    };
    let lookup = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(target));
    match lookup.await {
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(bad),
        _ => Err(bad()),
    }
}

pub(crate) async fn register(
    State(state): Shared,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    params(
        &state,
        query.as_deref(),
        &["replace-existing-checks"],
        false,
    )?
    .flag("replace-existing-checks")?;
    let body = body_bytes(body)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "Request decode failed: a JSON body is required",
        ));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("Request decode failed: {error}")))?;
    let f = fields(value, "the registration", REGISTRATION_FIELDS)?;
    for field in ["Proxy", "Connect", "SocketPath", "Locality"] {
        if !empty(&f, field) {
            return Err(ApiError::bad_request(format!(
                "{field} is not supported by this agent (no Connect service mesh)"
            )));
        }
    }
    if !empty(&f, "Kind") {
        return Err(ApiError::bad_request(
            "Kind is not supported: only typical services (Kind \"\") register here",
        ));
    }
    for scope in ["Namespace", "Partition"] {
        if let Some(value) = string_field(&f, scope)? {
            if !(value.is_empty() || value == "default") {
                return Err(ApiError::bad_request(format!(
                    "{scope} {value:?} is not supported; only \"default\""
                )));
            }
        }
    }
    let name = string_field(&f, "Name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("Missing service name"))?;
    let id = string_field(&f, "ID")?
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| name.clone());
    let port: u16 = decode(&f, "Port", "an integer 0-65535")?.unwrap_or(0);
    let address = string_field(&f, "Address")?.unwrap_or_default();
    let addr = if address.is_empty() {
        None
    } else {
        Some(address.parse::<IpAddr>().map_err(|_| {
            ApiError::bad_request(format!(
                "Address {address:?} is not an IP address (host names are not supported)"
            ))
        })?)
    };
    let tags: Vec<String> = decode(&f, "Tags", "a list of strings")?.unwrap_or_default();
    let meta: BTreeMap<String, String> =
        decode(&f, "Meta", "an object of strings")?.unwrap_or_default();
    let weights = match f.get("Weights") {
        None => Weights::default(),
        Some(value) => {
            let w = fields(value.clone(), "Weights", &["Passing", "Warning"])?;
            let passing: i64 = decode(&w, "Passing", "an integer")?.unwrap_or(1);
            let warning: i64 = decode(&w, "Warning", "an integer")?.unwrap_or(1);
            if !(1..=65_535).contains(&passing) || !(0..=65_535).contains(&warning) {
                return Err(ApiError::bad_request(
                    "Weights.Passing must be 1-65535 and Weights.Warning 0-65535",
                ));
            }
            Weights { passing, warning }
        }
    };
    let enable_tag_override: bool = decode(&f, "EnableTagOverride", "a boolean")?.unwrap_or(false);
    let tagged_addresses: BTreeMap<String, Value> =
        decode(&f, "TaggedAddresses", "an object")?.unwrap_or_default();
    let mut service = Service::new(name.clone(), id.clone(), port);
    service.addr = addr;
    service.tags = tags.clone();
    service.meta = meta.clone();
    service.validate().map_err(crate::Error::from)?;
    let mut raw_checks: Vec<Value> = Vec::new();
    if let Some(check) = f.get("Check") {
        raw_checks.push(check.clone());
    }
    match f.get("Checks") {
        None => {}
        Some(Value::Array(list)) => {
            raw_checks.extend(list.iter().filter(|c| !c.is_null()).cloned())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "Request decode failed: Checks must be a list",
            ))
        }
    }
    // An empty check object (some clients send `"Check": {}`) is no check.
    raw_checks.retain(|c| !c.as_object().is_some_and(Map::is_empty));
    if raw_checks.len() > MAX_CHECKS {
        return Err(ApiError::bad_request(format!(
            "{} checks given; this agent runs at most {MAX_CHECKS} check per service \
             (it keeps one health per instance)",
            raw_checks.len()
        )));
    }
    let numbered = raw_checks.len() > 1;
    let mut defs = Vec::new();
    for (n, raw) in raw_checks.into_iter().enumerate() {
        let mut def = check_definition(raw, &id, &name, numbered.then_some(n + 1)).await?;
        def.local.index = n;
        defs.push(def);
    }
    let ids: BTreeSet<&str> = defs.iter().map(|d| d.local.id.as_str()).collect();
    if ids.len() < defs.len() {
        return Err(ApiError::bad_request(
            "two checks of the service have the same CheckID",
        ));
    }
    // Consul's DeregisterCriticalServiceAfter: the shortest one given.
    let deregister_after = defs.iter().filter_map(|d| d.deregister_after).min();
    let initial: Vec<(usize, Health)> = defs
        .iter()
        .filter(|d| d.local.ttl)
        .filter_map(|d| d.initial.map(|h| (d.local.index, h)))
        .collect();
    let (checks, local_checks): (Vec<Check>, Vec<LocalCheck>) =
        defs.into_iter().map(|d| (d.check, d.local)).unzip();
    let handle = if checks.is_empty() {
        state.node.register(service).await?
    } else {
        state.node.register_with_checks(service, checks).await?
    };
    // A TTL check starts critical unless the registration gave its status.
    for (n, health) in initial {
        handle.report_check(n, health).await?;
    }
    let reaper = deregister_after.map(|after| tokio::spawn(reap(state.clone(), id.clone(), after)));
    let local = LocalService {
        handle,
        weights,
        enable_tag_override,
        tagged_addresses,
        checks: local_checks,
        reaper,
    };
    lock(&state.services).insert(id.clone(), local);
    settle(&state.node, &id, |found| {
        found.is_some_and(|i| {
            i.port == port && i.tags == tags && i.meta == meta && addr.is_none_or(|a| a == i.addr)
        })
    })
    .await;
    Ok(ok_empty())
}

/// Deregisters the local service `id` once its health has been critical for `after`
/// (Consul's `DeregisterCriticalServiceAfter`); ends with the server or the service.
async fn reap(state: Arc<AppState>, id: String, after: Duration) {
    let catalog = state.node.catalog();
    let local = state.node.identity().name;
    let mut critical_since: Option<tokio::time::Instant> = None;
    loop {
        let index = catalog.index();
        let health = catalog
            .all_instances()
            .into_iter()
            .find(|i| i.node == local && i.id == id)
            .map(|i| i.health);
        let Some(health) = health else { return };
        critical_since = match (health, critical_since) {
            (Health::Critical, None) => Some(tokio::time::Instant::now()),
            (Health::Critical, since) => since,
            _ => None,
        };
        let deadline = critical_since.map(|since| since + after);
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => return,
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!(%id, ?after, "deregistering a service critical for too long");
                lock(&state.services).remove(&id);
                let _ = state.node.deregister(&id).await;
                return;
            }
            next = catalog.wait_past(index) => if next.is_none() { return },
        }
    }
}

pub(crate) async fn deregister(
    State(state): Shared,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    params(&state, query.as_deref(), &[], false)?;
    state
        .node
        .deregister(&id)
        .await
        .map_err(|error| match error {
            crate::Error::Catalog(crate::state::catalog::CatalogError::UnknownService(_)) => {
                ApiError::not_found(format!("Unknown service ID {id:?}"))
            }
            other => other.into(),
        })?;
    lock(&state.services).remove(&id);
    settle(&state.node, &id, |found| found.is_none()).await;
    Ok(ok_empty())
}

/// The handle of a service this API did not register (restored from the data dir or
/// declared at start) for a check id of Consul's default form, `service:{id}` or
/// `service:{id}:N`, with the check's position.
fn restored_check(node: &Node, check_id: &str) -> Option<(ServiceHandle, String, usize)> {
    let rest = check_id.strip_prefix("service:")?;
    if let Some(handle) = node.service_handle(rest) {
        return Some((handle, rest.to_string(), 0));
    }
    let (id, number) = rest.rsplit_once(':')?;
    let number: usize = number.parse().ok()?;
    let handle = node.service_handle(id)?;
    Some((handle, id.to_string(), number.checked_sub(1)?))
}

/// Reports a TTL check: `check/pass|warn|fail/{id}?note=` and `check/update/{id}`.
async fn report(
    state: &AppState,
    check_id: &str,
    health: Health,
    output: Option<String>,
) -> Result<Response, ApiError> {
    let known = lock(&state.services)
        .values()
        .any(|s| s.checks.iter().any(|c| c.id == check_id));
    if !known {
        if let Some((handle, service_id, n)) = restored_check(&state.node, check_id) {
            // A registration restored from the data dir (or declared at start): its checks
            // keep Consul's default ids.
            handle.report_check(n, health).await?;
            let statuses = handle.check_statuses();
            let want = if statuses.is_empty() {
                health
            } else {
                crate::node::worst_health(&statuses)
            };
            settle(&state.node, &service_id, |found| {
                found.is_some_and(|i| i.health == want)
            })
            .await;
            return Ok(ok_empty());
        }
    }
    let (handle, service_id, n) = {
        let mut services = lock(&state.services);
        let found = services.iter_mut().find_map(|(sid, s)| {
            let handle = s.handle.clone();
            s.checks
                .iter_mut()
                .find(|c| c.id == check_id)
                .map(|c| (c, handle, sid.clone()))
        });
        let Some((check, handle, sid)) = found else {
            return Err(ApiError::not_found(format!(
                "Unknown check ID {check_id:?}. Ensure that the check ID is passed, not the \
                 check name."
            )));
        };
        if !check.ttl {
            return Err(ApiError::bad_request(format!(
                "CheckID {check_id:?} does not have associated TTL"
            )));
        }
        if let Some(output) = output {
            check.output = output;
        }
        (handle, sid, check.index)
    };
    handle.report_check(n, health).await?;
    let want = crate::node::worst_health(&handle.check_statuses());
    settle(&state.node, &service_id, |found| {
        found.is_some_and(|i| i.health == want)
    })
    .await;
    Ok(ok_empty())
}

/// Longest check output kept (Consul's default `OutputMaxSize`).
const MAX_OUTPUT: usize = 4096;

fn truncate(mut text: String) -> String {
    if text.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub(crate) async fn check_verdict(
    State(state): Shared,
    Path((verdict, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["note"], false)?;
    let health = match verdict.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        other => {
            return Err(ApiError::not_found(format!(
                "no check verdict {other:?}; use pass, warn, fail or update"
            )))
        }
    };
    let note = params.string("note").map(|n| truncate(n.to_string()));
    report(&state, &id, health, note).await
}

pub(crate) async fn check_update(
    State(state): Shared,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    params(&state, query.as_deref(), &[], false)?;
    let body = body_bytes(body)?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("Request decode failed: {error}")))?;
    let f = fields(value, "the update", &["Status", "Output"])?;
    let health = match string_field(&f, "Status")?.as_deref() {
        Some("passing") => Health::Passing,
        Some("warning") => Health::Warning,
        Some("critical") => Health::Critical,
        other => {
            return Err(ApiError::bad_request(format!(
                "Invalid check status: {:?}",
                other.unwrap_or_default()
            )))
        }
    };
    let output = string_field(&f, "Output")?.unwrap_or_default();
    report(&state, &id, health, Some(truncate(output))).await
}

// ---- catalog ----

pub(crate) async fn catalog_services(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["node-meta"], true)?;
    let (index, services) = block_catalog(&state, &params, |node: &Node| {
        let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        if !node_meta_matches(&params) {
            return services;
        }
        for instance in node.catalog().all_instances() {
            if instance.node_status.is_active() {
                services
                    .entry(instance.service.clone())
                    .or_default()
                    .extend(instance.tags);
            }
        }
        services
    })
    .await?;
    Ok(answer(&params, index, &services))
}

pub(crate) async fn catalog_service(
    State(state): Shared,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(
        &state,
        query.as_deref(),
        &["tag", "near", "node-meta", "merge-central-config"],
        true,
    )?;
    params.flag("merge-central-config")?;
    check_service_name(&name)?;
    let (index, entries) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let mut entries: Vec<CatalogService> = view
            .instances
            .iter()
            .filter(|i| i.service == name && tags_match(&params, i) && node_meta_matches(&params))
            .filter_map(|i| {
                let member = view.members.get(&i.node)?;
                let node = view.catalog_node(&state, member);
                let service = view.service(&state, i);
                Some(CatalogService {
                    id: node.id,
                    node: node.node,
                    address: node.address,
                    datacenter: node.datacenter,
                    tagged_addresses: node.tagged_addresses,
                    node_meta: node.meta,
                    service_id: service.id,
                    service_name: service.service,
                    service_address: service.address,
                    service_tags: service.tags,
                    service_meta: service.meta,
                    service_port: service.port,
                    service_weights: service.weights,
                    service_enable_tag_override: service.enable_tag_override,
                    service_tagged_addresses: service.tagged_addresses,
                    create_index: service.create_index,
                    modify_index: service.modify_index,
                })
            })
            .collect();
        near(&params, &view.local, &mut entries, |e| &e.node);
        entries
    })
    .await?;
    Ok(answer(&params, index, &entries))
}

pub(crate) async fn catalog_nodes(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["near", "node-meta"], true)?;
    let (index, nodes) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let mut nodes: Vec<CatalogNode> = view
            .nodes()
            .filter(|_| node_meta_matches(&params))
            .map(|m| view.catalog_node(&state, m))
            .collect();
        near(&params, &view.local, &mut nodes, |n| &n.node);
        nodes
    })
    .await?;
    Ok(answer(&params, index, &nodes))
}

#[derive(Debug, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeServices {
    node: CatalogNode,
    services: BTreeMap<String, AgentService>,
}

pub(crate) async fn catalog_node_services(
    State(state): Shared,
    Path(node): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], true)?;
    let (index, found) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let member = view.nodes().find(|m| m.name == node)?;
        Some(NodeServices {
            node: view.catalog_node(&state, member),
            services: view
                .instances
                .iter()
                .filter(|i| i.node == node)
                .map(|i| (i.id.clone(), view.service(&state, i)))
                .collect(),
        })
    })
    .await?;
    // Consul answers an unknown node with `null`.
    Ok(answer(&params, index, &found))
}

pub(crate) async fn datacenters(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], false)?;
    let index = state.node.catalog().index();
    Ok(answer(&params, index, &[&state.options.datacenter]))
}

// ---- health ----

pub(crate) async fn health_service(
    State(state): Shared,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(
        &state,
        query.as_deref(),
        &[
            "tag",
            "passing",
            "near",
            "node-meta",
            "merge-central-config",
        ],
        true,
    )?;
    params.flag("merge-central-config")?;
    check_service_name(&name)?;
    let passing = params.flag("passing")?;
    let (index, entries) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let mut entries: Vec<ServiceEntry> = view
            .instances
            .iter()
            .filter(|i| i.service == name && tags_match(&params, i) && node_meta_matches(&params))
            .filter_map(|i| view.entry(&state, i))
            .filter(|e| !passing || e.checks.iter().all(|c| c.status == "passing"))
            .collect();
        near(&params, &view.local, &mut entries, |e| &e.node.node);
        entries
    })
    .await?;
    Ok(answer(&params, index, &entries))
}

pub(crate) async fn health_checks(
    State(state): Shared,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["near", "node-meta"], true)?;
    check_service_name(&name)?;
    let (index, checks) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let mut checks: Vec<HealthCheck> = view
            .instances
            .iter()
            .filter(|i| i.service == name && node_meta_matches(&params))
            .flat_map(|i| view.checks(i))
            .collect();
        near(&params, &view.local, &mut checks, |c| &c.node);
        checks
    })
    .await?;
    Ok(answer(&params, index, &checks))
}

pub(crate) async fn health_node(
    State(state): Shared,
    Path(node): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &[], true)?;
    let (index, checks) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let Some(member) = view.nodes().find(|m| m.name == node) else {
            return Vec::new();
        };
        let mut checks = vec![view.serf_check(member)];
        for instance in view.instances.iter().filter(|i| i.node == node) {
            checks.extend(view.checks(instance));
        }
        checks
    })
    .await?;
    Ok(answer(&params, index, &checks))
}

pub(crate) async fn health_state(
    State(state): Shared,
    Path(wanted): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), &["near", "node-meta"], true)?;
    if !matches!(wanted.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(ApiError::bad_request(format!(
            "Invalid state {wanted:?}: use any, passing, warning or critical"
        )));
    }
    let (index, checks) = block_catalog(&state, &params, |_: &Node| {
        let view = View::read(&state);
        let mut checks: Vec<HealthCheck> = view.nodes().map(|m| view.serf_check(m)).collect();
        for instance in &view.instances {
            checks.extend(view.checks(instance));
        }
        checks.retain(|c| (wanted == "any" || c.status == wanted) && node_meta_matches(&params));
        near(&params, &view.local, &mut checks, |c| &c.node);
        checks
    })
    .await?;
    Ok(answer(&params, index, &checks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_as_consul_decodes_them() {
        assert_eq!(
            normalize("EnableTagOverride"),
            normalize("enable_tag_override")
        );
        assert_eq!(normalize("ID"), normalize("id"));
        assert_eq!(
            normalize("DeregisterCriticalServiceAfter"),
            normalize("deregistercriticalserviceafter")
        );
        let f = fields(
            serde_json::json!({"name": "web", "PORT": 80, "tags": null}),
            "x",
            REGISTRATION_FIELDS,
        )
        .unwrap();
        assert_eq!(f.get("Name"), Some(&Value::String("web".into())));
        assert!(f.contains_key("Port") && !f.contains_key("Tags"));
        assert!(fields(serde_json::json!({"Nmae": "web"}), "x", REGISTRATION_FIELDS).is_err());
    }

    #[test]
    fn node_ids_are_uuid_shaped_and_stable() {
        let id = node_id("a");
        assert_eq!(id.len(), 36);
        assert_eq!(id, node_id("a"));
        assert_ne!(id, node_id("b"));
    }
}
