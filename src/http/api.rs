//! The routes of the HTTP API and their handlers.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::query::{parse_duration, Params};
use super::{ApiError, AppState, INDEX_HEADER};
use crate::node::{Check, ConfigEvent, Instance, Node, Query};
use crate::state::catalog::{Health, Service};
use crate::state::config::{validate_key, MAX_KEY_LEN};

type Shared = State<Arc<AppState>>;

/// The status page, bundled in the binary.
const STATUS_PAGE: &str = include_str!("status.html");
/// Config keys listed on the status page at most.
const STATUS_KEYS: usize = 500;
/// Bytes of each config value the status page shows.
const STATUS_PREVIEW: usize = 80;
/// Shortest and longest check period accepted at registration.
const CHECK_PERIOD: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(86_400));

/// Builds the router of the whole API.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/members", get(members))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/check/{verdict}/{id}", put(check))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/kv", get(kv_list_all))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/stream/catalog", get(stream_catalog))
        .route("/v1/stream/kv", get(stream_kv_all))
        .route("/v1/stream/kv/{*prefix}", get(stream_kv))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// Times every request into the server's metrics.
async fn record(State(state): Shared, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let _running = request
        .extensions()
        .get::<axum::extract::ConnectInfo<super::ConnectionRequests>>()
        .map(|info| info.0.start());
    let started = tokio::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state
        .metrics
        .request(&route, &method, status, started.elapsed());
    response
}

async fn unknown_route() -> ApiError {
    ApiError::not_found("no such endpoint; see docs/openapi.yaml")
}

/// JSON with the index of the view it was read from.
fn indexed<T: Serialize>(index: u64, body: &T) -> Response {
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

async fn status_page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

async fn metrics(State(state): Shared, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let text = state.metrics.render(&state.node, state.watchers_open());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Serialize)]
struct NodeInfo {
    name: String,
    addr: std::net::SocketAddr,
    generation: u64,
    version: &'static str,
}

fn node_info(state: &AppState) -> NodeInfo {
    let identity = state.node.identity();
    NodeInfo {
        name: identity.name,
        addr: identity.addr,
        generation: identity.generation,
        version: env!("CARGO_PKG_VERSION"),
    }
}

async fn agent_self(State(state): Shared, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let body = serde_json::json!({
        "node": node_info(&state),
        "stats": state.node.stats(),
        "catalog_index": state.node.catalog().index(),
        "config_seq": state.node.config().current_seq(),
    });
    Ok(Json(body).into_response())
}

#[derive(Serialize)]
struct StatusKey {
    key: String,
    preview: String,
    bytes: usize,
}

/// Everything the status page shows, in one read.
async fn status(State(state): Shared, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let config = state.node.config();
    let keys: Vec<StatusKey> = config
        .keys("")
        .into_iter()
        .take(STATUS_KEYS)
        .filter_map(|key| {
            let value = config.get(&key)?;
            let shown = &value[..value.len().min(STATUS_PREVIEW)];
            Some(StatusKey {
                preview: String::from_utf8_lossy(shown).into_owned(),
                bytes: value.len(),
                key,
            })
        })
        .collect();
    let catalog = state.node.catalog();
    let body = serde_json::json!({
        "node": node_info(&state),
        "catalog_index": catalog.index(),
        "config_seq": config.current_seq(),
        "members": state.node.members(),
        "instances": catalog.all_instances(),
        "config": { "count": config.key_count(), "keys": keys },
    });
    Ok(Json(body).into_response())
}

/// Answers a catalog read, as a blocking query when an index is given: it waits until the
/// catalog index passes that one *and* `read` answers something different from what it
/// answered at that index (or the wait ends), so that changes elsewhere in the cluster do
/// not wake every watcher. The index answered is the current one.
async fn block_catalog<T, F>(
    state: &AppState,
    params: &Params,
    read: F,
) -> Result<Response, ApiError>
where
    T: PartialEq + Serialize,
    F: Fn(&Node) -> T,
{
    let catalog = state.node.catalog();
    let wait = params.wait(state.options.default_wait, state.options.max_wait)?;
    let mut index = catalog.index();
    let before = read(&state.node);
    // No index, an older one (the view moved on) or one from the future (an earlier run of
    // the agent): answer at once; the client then blocks on the current index.
    if params.index()? != Some(index) {
        return Ok(indexed(index, &before));
    }
    let _permit = state.watcher()?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut changed = None;
    loop {
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => break,
            () = tokio::time::sleep_until(deadline) => break,
            next = catalog.wait_past(index) => {
                let Some(next) = next else { break };
                index = next;
                let now = read(&state.node);
                if now != before {
                    changed = Some(now);
                    break;
                }
            }
        }
    }
    // Without a change, the answer is still what it was at the index given.
    Ok(indexed(index, &changed.unwrap_or(before)))
}

/// Waits, for a blocking query on the config store, until something under `prefix` changed
/// after the index given (or the wait ends); returns the index to answer with.
async fn block_config(state: &AppState, params: &Params, prefix: &str) -> Result<u64, ApiError> {
    let config = state.node.config();
    let wait = params.wait(state.options.default_wait, state.options.max_wait)?;
    let Some(after) = params.index()? else {
        return Ok(config.current_seq());
    };
    if after > config.current_seq() {
        return Ok(config.current_seq());
    }
    let _permit = state.watcher()?;
    let mut watch = config.watch_prefix_from(prefix, after);
    tokio::select! {
        biased;
        () = state.shutdown.cancelled() => {}
        _ = tokio::time::timeout(wait, watch.next()) => {}
    }
    Ok(config.current_seq())
}

async fn members(State(state): Shared, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), &["index", "wait"])?;
    // Member changes republish the catalog view, so its index covers them.
    block_catalog(&state, &params, Node::members).await
}

async fn agent_services(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), &["index", "wait"])?;
    block_catalog(&state, &params, |node| {
        let local = node.identity().name;
        node.catalog()
            .all_instances()
            .into_iter()
            .filter(|i| i.node == local)
            .map(|i| (i.id.clone(), i))
            .collect::<BTreeMap<String, Instance>>()
    })
    .await
}

/// A service registration, as `PUT /v1/agent/service/register` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    name: String,
    /// Defaults to the name.
    id: Option<String>,
    port: u16,
    /// Defaults to the agent's advertised address.
    address: Option<IpAddr>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    check: Option<CheckSpec>,
}

/// A health check: exactly one of `ttl` (the service reports in) or `tcp` (the agent
/// connects to the port every period).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSpec {
    ttl: Option<String>,
    tcp: Option<String>,
}

fn check_period(field: &str, text: &str) -> Result<Duration, ApiError> {
    let period = parse_duration(text)
        .map_err(|error| ApiError::bad_request(format!("check.{field}={text:?}: {error}")))?;
    let (min, max) = CHECK_PERIOD;
    if period < min || period > max {
        return Err(ApiError::bad_request(format!(
            "check.{field}={text:?} must be between {min:?} and {max:?}"
        )));
    }
    Ok(period)
}

/// Reads a JSON body, with errors a client can act on (400, or 413 when too large).
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body_bytes(body)?;
    if body.is_empty() {
        return Err(ApiError::bad_request("a JSON body is required"));
    }
    serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large".to_string()
        } else {
            rejection.body_text()
        };
        ApiError::new(status, message)
    })
}

async fn register(
    State(state): Shared,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let registration: Registration = json_body(body)?;
    if registration.port == 0 {
        return Err(ApiError::bad_request("port must be 1-65535"));
    }
    let id = registration.id.unwrap_or_else(|| registration.name.clone());
    let (port, tags, meta, address) = (
        registration.port,
        registration.tags.clone(),
        registration.meta.clone(),
        registration.address,
    );
    let mut service = Service::new(registration.name, id.clone(), registration.port);
    service.addr = registration.address;
    service.tags = registration.tags;
    service.meta = registration.meta;
    service.validate().map_err(crate::Error::from)?;
    let check = match registration.check {
        None => None,
        Some(CheckSpec {
            ttl: Some(ttl),
            tcp: None,
        }) => Some(Check::ttl(check_period("ttl", &ttl)?)),
        Some(CheckSpec {
            ttl: None,
            tcp: Some(tcp),
        }) => Some(Check::tcp(check_period("tcp", &tcp)?)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "check needs exactly one of \"ttl\" or \"tcp\"",
            ))
        }
    };
    let handle = match check {
        Some(check) => state.node.register_with_check(service, check).await?,
        None => state.node.register(service).await?,
    };
    super::lock(&state.handles).insert(id.clone(), handle);
    let registered = settle(&state.node, &id, |found| {
        found.is_some_and(|i| {
            i.port == port
                && i.tags == tags
                && i.meta == meta
                && address.is_none_or(|a| a == i.addr)
        })
    })
    .await;
    let health = registered.map(|i| i.health);
    Ok(Json(serde_json::json!({ "id": id, "health": health })).into_response())
}

/// How long a write waits to show in this agent's own reads.
const SETTLE: Duration = Duration::from_secs(2);

/// Waits (at most [`SETTLE`]) until this node's published catalog shows the instance `id`
/// as `done` wants, so that a client reads its own write on its next request; returns the
/// instance as last seen.
async fn settle(
    node: &Node,
    id: &str,
    done: impl Fn(Option<&Instance>) -> bool,
) -> Option<Instance> {
    let catalog = node.catalog();
    let local = node.identity().name;
    let find = || {
        catalog
            .all_instances()
            .into_iter()
            .find(|i| i.node == local && i.id == id)
    };
    let wait = async {
        loop {
            let index = catalog.index();
            let found = find();
            if done(found.as_ref()) {
                return found;
            }
            catalog.wait_past(index).await?;
        }
    };
    match tokio::time::timeout(SETTLE, wait).await {
        Ok(found) => found,
        Err(_) => find(),
    }
}

async fn deregister(
    State(state): Shared,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    state.node.deregister(&id).await?;
    super::lock(&state.handles).remove(&id);
    settle(&state.node, &id, |found| found.is_none()).await;
    Ok(Json(serde_json::json!({ "deregistered": id })).into_response())
}

async fn check(
    State(state): Shared,
    Path((verdict, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &["note"])?;
    let health = match verdict.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        other => {
            return Err(ApiError::not_found(format!(
                "no check verdict {other:?}; use pass, warn or fail"
            )))
        }
    };
    // Services restored from the data dir or declared at start have only the node's handle.
    let handle = super::lock(&state.handles).get(&id).cloned();
    let handle = handle.or_else(|| state.node.service_handle(&id));
    let handle = handle.ok_or_else(|| {
        ApiError::not_found(format!(
            "no service with id {id:?} is registered on this agent"
        ))
    })?;
    match health {
        Health::Passing => handle.pass().await?,
        Health::Warning => handle.warn().await?,
        Health::Critical => handle.fail().await?,
    }
    settle(&state.node, &id, |found| {
        found.is_some_and(|i| i.health == health)
    })
    .await;
    Ok(Json(serde_json::json!({ "id": id, "health": health })).into_response())
}

#[derive(Serialize, PartialEq)]
struct ServiceEntry {
    instances: usize,
    passing: usize,
    tags: BTreeSet<String>,
}

async fn catalog_services(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), &["index", "wait"])?;
    block_catalog(&state, &params, service_summaries).await
}

fn service_summaries(node: &Node) -> BTreeMap<String, ServiceEntry> {
    let mut services: BTreeMap<String, ServiceEntry> = BTreeMap::new();
    for instance in node.catalog().all_instances() {
        if !instance.node_status.is_active() {
            continue;
        }
        let entry = services
            .entry(instance.service.clone())
            .or_insert_with(|| ServiceEntry {
                instances: 0,
                passing: 0,
                tags: BTreeSet::new(),
            });
        entry.instances += 1;
        entry.passing += usize::from(instance.health == Health::Passing);
        entry.tags.extend(instance.tags);
    }
    services
}

fn check_service_name(name: &str) -> Result<(), ApiError> {
    Service::new(name, "x", 1)
        .validate()
        .map_err(|error| ApiError::bad_request(error.to_string()))
}

async fn health_service(
    State(state): Shared,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), &["passing", "tag", "index", "wait"])?;
    check_service_name(&name)?;
    let mut lookup = Query {
        tags: params.all("tag"),
        include_unhealthy: !params.flag("passing")?,
    };
    lookup.tags.sort();
    lookup.tags.dedup();
    block_catalog(&state, &params, |node| {
        node.catalog().lookup_with(&name, &lookup)
    })
    .await
}

/// A config entry as JSON: the value as text when it is UTF-8, else as base64.
#[derive(Serialize)]
struct KvEntry {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

impl KvEntry {
    fn new(key: String, value: Vec<u8>) -> Self {
        match String::from_utf8(value) {
            Ok(text) => KvEntry {
                key,
                value: Some(text),
                value_base64: None,
            },
            Err(error) => KvEntry {
                key,
                value: None,
                value_base64: Some(
                    base64::engine::general_purpose::STANDARD.encode(error.into_bytes()),
                ),
            },
        }
    }
}

fn check_prefix(prefix: &str) -> Result<(), ApiError> {
    if prefix.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_request(format!(
            "prefix is {} bytes; keys are at most {MAX_KEY_LEN}",
            prefix.len()
        )));
    }
    Ok(())
}

const KV_READ_PARAMS: &[&str] = &["recurse", "keys", "raw", "index", "wait"];

async fn kv_list_all(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), KV_READ_PARAMS)?;
    if !(params.flag("recurse")? || params.flag("keys")?) {
        return Err(ApiError::bad_request(
            "give a key (/v1/kv/KEY), or ?recurse or ?keys to list every key",
        ));
    }
    kv_read(&state, &params, "").await
}

async fn kv_get(
    State(state): Shared,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref(), KV_READ_PARAMS)?;
    kv_read(&state, &params, &key).await
}

async fn kv_read(state: &AppState, params: &Params, key: &str) -> Result<Response, ApiError> {
    let recurse = params.flag("recurse")?;
    let keys_only = params.flag("keys")?;
    let raw = params.flag("raw")?;
    if recurse || keys_only {
        if raw {
            return Err(ApiError::bad_request(
                "raw reads one key; drop recurse/keys",
            ));
        }
        check_prefix(key)?;
    } else {
        validate_key(key).map_err(|error| ApiError::bad_request(error.to_string()))?;
    }
    let index = block_config(state, params, key).await?;
    let config = state.node.config();
    if keys_only {
        let keys = config.keys(key);
        if keys.is_empty() {
            return Err(not_found_at(index, format!("no keys under {key:?}")));
        }
        return Ok(indexed(index, &keys));
    }
    if recurse {
        let entries: Vec<KvEntry> = config
            .list(key)
            .into_iter()
            .map(|(key, value)| KvEntry::new(key, value))
            .collect();
        if entries.is_empty() {
            return Err(not_found_at(index, format!("no keys under {key:?}")));
        }
        return Ok(indexed(index, &entries));
    }
    let Some(value) = config.get(key) else {
        return Err(not_found_at(index, format!("key {key:?} is not set")));
    };
    if raw {
        let mut response =
            ([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response();
        response
            .headers_mut()
            .insert(INDEX_HEADER, HeaderValue::from(index));
        return Ok(response);
    }
    Ok(indexed(index, &KvEntry::new(key.to_string(), value)))
}

/// A 404 that still carries the index, so that a client can block on the key appearing.
fn not_found_at(index: u64, message: String) -> ApiError {
    ApiError::not_found(message).with_index(index)
}

async fn kv_put(
    State(state): Shared,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let value = body_bytes(body)?;
    let change = state.node.config().set(&key, value.to_vec()).await?;
    Ok(indexed(
        change.seq,
        &serde_json::json!({ "key": key, "seq": change.seq }),
    ))
}

async fn kv_delete(
    State(state): Shared,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    validate_key(&key).map_err(|error| ApiError::bad_request(error.to_string()))?;
    let config = state.node.config();
    if !config.delete(&key).await? {
        return Err(ApiError::not_found(format!("key {key:?} is not set")));
    }
    let seq = config.current_seq();
    Ok(indexed(
        seq,
        &serde_json::json!({ "deleted": key, "seq": seq }),
    ))
}

type BoxedEvents = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;
type EventStream = Sse<axum::response::sse::KeepAliveStream<BoxedEvents>>;

fn sse(state: &AppState, stream: impl Stream<Item = Event> + Send + 'static) -> EventStream {
    use futures_util::StreamExt;
    let stream: BoxedEvents = Box::pin(stream.map(Ok));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(state.options.keep_alive))
}

/// `event: catalog` with the whole catalog (or one service's instances) on connecting and
/// after every change; `id` is the catalog index.
async fn stream_catalog(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<EventStream, ApiError> {
    let params = Params::parse(query.as_deref(), &["service", "passing", "tag"])?;
    let service = params.string("service").map(str::to_string);
    if let Some(name) = &service {
        check_service_name(name)?;
    }
    let lookup = Query {
        tags: params.all("tag"),
        include_unhealthy: !params.flag("passing")?,
    };
    let permit = state.watcher()?;
    let catalog = state.node.catalog();
    let shutdown = state.shutdown.clone();
    let render = move |catalog: &crate::node::CatalogHandle| -> String {
        let body = match &service {
            Some(name) => serde_json::to_value(catalog.lookup_with(name, &lookup)),
            None => {
                let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
                for instance in catalog.all_instances() {
                    services
                        .entry(instance.service.clone())
                        .or_default()
                        .push(instance);
                }
                serde_json::to_value(services)
            }
        };
        body.map(|value| value.to_string())
            .unwrap_or_else(|error| serde_json::json!({ "error": error.to_string() }).to_string())
    };
    let start = (catalog, None::<(u64, String)>, permit, shutdown);
    let stream = futures_util::stream::unfold(start, move |(catalog, last, permit, shutdown)| {
        let render = render.clone();
        async move {
            let mut last = last;
            loop {
                if let Some((index, _)) = &last {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return None,
                        next = catalog.wait_past(*index) => { next?; }
                    }
                }
                let index = catalog.index();
                let data = render(&catalog);
                // A change elsewhere in the catalog need not reach a filtered stream.
                let same = last.as_ref().is_some_and(|(_, before)| *before == data);
                last = Some((index, data.clone()));
                if !same {
                    let event = Event::default()
                        .event("catalog")
                        .id(index.to_string())
                        .data(data);
                    return Some((event, (catalog, last, permit, shutdown)));
                }
            }
        }
    });
    Ok(sse(&state, stream))
}

async fn stream_kv_all(
    state: Shared,
    headers: HeaderMap,
    query: RawQuery,
) -> Result<EventStream, ApiError> {
    stream_kv_prefix(state, String::new(), headers, query).await
}

async fn stream_kv(
    state: Shared,
    Path(prefix): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
) -> Result<EventStream, ApiError> {
    stream_kv_prefix(state, prefix, headers, query).await
}

/// `event: set` / `event: delete` per change under the prefix, in the order the agent
/// applied them, `id` being the change's sequence number; `event: snapshot` when the
/// resume point (`Last-Event-ID` or `?index=`) was compacted away.
async fn stream_kv_prefix(
    State(state): Shared,
    prefix: String,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<EventStream, ApiError> {
    let params = Params::parse(query.as_deref(), &["index"])?;
    check_prefix(&prefix)?;
    let resume = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a sequence number"))?,
        ),
        None => params.index()?,
    };
    let permit = state.watcher()?;
    let config = state.node.config();
    let current = config.current_seq();
    let from = resume.filter(|seq| *seq <= current).unwrap_or(current);
    let watch = config.watch_prefix_from(&prefix, from);
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (watch, permit, shutdown),
        |(mut watch, permit, shutdown)| async move {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                event = watch.next() => event?,
            };
            let event = match event {
                ConfigEvent::Changed(change) => {
                    let kind = if change.value.is_some() {
                        "set"
                    } else {
                        "delete"
                    };
                    let entry = change
                        .value
                        .map(|value| KvEntry::new(change.key.clone(), value));
                    let data = match entry {
                        Some(entry) => serde_json::json!({ "seq": change.seq, "entry": entry }),
                        None => serde_json::json!({ "seq": change.seq, "key": change.key }),
                    };
                    Event::default()
                        .event(kind)
                        .id(change.seq.to_string())
                        .data(data.to_string())
                }
                ConfigEvent::Snapshot { seq, entries } => {
                    let entries: Vec<KvEntry> = entries
                        .into_iter()
                        .map(|(key, value)| KvEntry::new(key, value))
                        .collect();
                    Event::default()
                        .event("snapshot")
                        .id(seq.to_string())
                        .data(serde_json::json!({ "seq": seq, "entries": entries }).to_string())
                }
            };
            Some((event, (watch, permit, shutdown)))
        },
    );
    Ok(sse(&state, stream))
}
