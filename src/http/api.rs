//! The routes of the HTTP API and their handlers.

use std::collections::BTreeMap;
use std::convert::Infallible;
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
use serde::Serialize;

use super::query::Params;
use super::{ApiError, AppState, INDEX_HEADER};
use crate::node::{ConfigEvent, Instance, Node, Query};
use crate::state::catalog::Service;
use crate::state::config::MAX_KEY_LEN;

type Shared = State<Arc<AppState>>;

/// The status page, bundled in the binary.
const STATUS_PAGE: &str = include_str!("status.html");
/// Config keys listed on the status page at most.
const STATUS_KEYS: usize = 500;
/// Bytes of each config value the status page shows.
const STATUS_PREVIEW: usize = 80;

/// Builds the router of the whole API.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    use super::consul as c;
    use super::kv;
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/status/leader", get(c::status_leader))
        .route("/v1/status/peers", get(c::status_peers))
        .route("/v1/agent/self", get(c::agent_self))
        .route("/v1/agent/members", get(c::members))
        .route("/v1/agent/join/{address}", put(c::join))
        .route("/v1/agent/leave", put(c::leave))
        .route("/v1/agent/force-leave/{node}", put(c::force_leave))
        .route("/v1/agent/services", get(c::agent_services))
        .route("/v1/agent/service/register", put(c::register))
        .route("/v1/agent/service/deregister/{id}", put(c::deregister))
        .route("/v1/agent/service/{id}", get(c::agent_service))
        .route("/v1/agent/checks", get(c::agent_checks))
        .route(
            "/v1/agent/health/service/id/{id}",
            get(c::agent_health_by_id),
        )
        .route(
            "/v1/agent/health/service/name/{name}",
            get(c::agent_health_by_name),
        )
        .route("/v1/agent/check/update/{id}", put(c::check_update))
        .route("/v1/agent/check/{verdict}/{id}", put(c::check_verdict))
        .route("/v1/catalog/services", get(c::catalog_services))
        .route("/v1/catalog/service/{name}", get(c::catalog_service))
        .route("/v1/catalog/nodes", get(c::catalog_nodes))
        .route("/v1/catalog/node/{node}", get(c::catalog_node_services))
        .route("/v1/catalog/datacenters", get(c::datacenters))
        .route("/v1/health/service/{name}", get(c::health_service))
        .route("/v1/health/checks/{name}", get(c::health_checks))
        .route("/v1/health/node/{node}", get(c::health_node))
        .route("/v1/health/state/{state}", get(c::health_state))
        .route(
            "/v1/kv",
            get(kv::get_root).put(kv::put_root).delete(kv::delete_root),
        )
        .route(
            "/v1/kv/",
            get(kv::get_root).put(kv::put_root).delete(kv::delete_root),
        )
        .route(
            "/v1/kv/{*key}",
            get(kv::get).put(kv::put).delete(kv::delete),
        )
        .route("/v1/stream/catalog", get(stream_catalog))
        .route("/v1/stream/kv", get(stream_kv_all))
        .route("/v1/stream/kv/{*prefix}", get(stream_kv))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// Checks the token, times every request into the server's metrics, and stamps Consul's
/// headers on every answer (errors too): `X-Consul-Index` (the catalog index unless the
/// handler set one), `X-Consul-KnownLeader: true` and `X-Consul-LastContact: 0`, as a
/// one-server Consul whose server is this agent.
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
    let allowed = match &state.options.token {
        // The page itself holds no data; its reads carry the token.
        Some(token) if request.uri().path() != "/" => super::token::presented(&request)
            .is_some_and(|given| super::token::equal(&given, token)),
        _ => true,
    };
    let mut response = if allowed {
        // The body is read by the handler: hold its share of the budget until the answer.
        match state.body_reservation(&request) {
            Ok(_reserved) => next.run(request).await,
            Err(refused) => refused.into_response(),
        }
    } else {
        state.metrics.token_refused();
        ApiError::new(
            StatusCode::FORBIDDEN,
            "Permission denied: this agent requires its token \
             (X-Consul-Token header, Authorization: Bearer, or ?token=)",
        )
        .into_response()
    };
    let headers = response.headers_mut();
    if !headers.contains_key(INDEX_HEADER) {
        let index = state.node.catalog().index().max(1);
        headers.insert(INDEX_HEADER, HeaderValue::from(index));
    }
    headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    let status = response.status().as_u16();
    state
        .metrics
        .request(&route, &method, status, started.elapsed());
    response
}

async fn unknown_route() -> ApiError {
    ApiError::not_found("no such endpoint; see docs/openapi.yaml")
}

/// JSON with the index of the view it was read from (`?pretty` indents it).
pub(crate) fn indexed<T: Serialize>(index: u64, body: &T) -> Response {
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index.max(1)));
    response
}

/// As [`indexed`], indented when the query asked for `?pretty`.
pub(crate) fn answer<T: Serialize>(params: &Params, index: u64, body: &T) -> Response {
    if params.has("pretty") {
        let text = serde_json::to_string_pretty(body).unwrap_or_default();
        let mut response = ([(header::CONTENT_TYPE, "application/json")], text).into_response();
        response
            .headers_mut()
            .insert(INDEX_HEADER, HeaderValue::from(index.max(1)));
        return response;
    }
    indexed(index, body)
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
/// not wake every watcher. Returns the index to answer with (the current one, at least 1)
/// and the answer.
pub(crate) async fn block_catalog<T, F>(
    state: &AppState,
    params: &Params,
    read: F,
) -> Result<(u64, T), ApiError>
where
    T: PartialEq,
    F: Fn(&Node) -> T,
{
    let catalog = state.node.catalog();
    let wait = params.wait(state.options.default_wait, state.options.max_wait)?;
    let mut index = catalog.index();
    let before = read(&state.node);
    // No index, an older one (the view moved on) or one from the future (an earlier run of
    // the agent): answer at once; the client then blocks on the current index.
    if params.index()? != Some(index.max(1)) {
        return Ok((index.max(1), before));
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
    Ok((index.max(1), changed.unwrap_or(before)))
}

/// Waits, for a blocking query on the config store, until a key that `matches` changed
/// after the index given (or the wait ends); returns the index to answer with (the store's
/// current change seq, at least 1). `prefix` is a plain-string prefix of every key
/// `matches` accepts.
pub(crate) async fn block_config(
    state: &AppState,
    params: &Params,
    prefix: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<u64, ApiError> {
    let config = state.node.config();
    let wait = params.wait(state.options.default_wait, state.options.max_wait)?;
    let current = config.current_seq();
    let Some(after) = params.index()? else {
        return Ok(current.max(1));
    };
    // Only the index last answered blocks (1 stands for 0, an empty store).
    if after != current.max(1) {
        return Ok(current.max(1));
    }
    let _permit = state.watcher()?;
    // Watches match whole segments: watch the last whole segment above the prefix.
    let parent = prefix.rfind('/').map_or("", |at| &prefix[..at]);
    let mut watch = config.watch_prefix_from(parent, current);
    let changed = async {
        loop {
            match watch.next().await {
                Some(ConfigEvent::Changed(change)) if !matches(&change.key) => continue,
                _ => return,
            }
        }
    };
    tokio::select! {
        biased;
        () = state.shutdown.cancelled() => {}
        _ = tokio::time::timeout(wait, changed) => {}
    }
    Ok(config.current_seq().max(1))
}

pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
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

/// How long a write waits to show in this agent's own reads.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

/// Waits (at most [`SETTLE`]) until this node's published catalog shows the instance `id`
/// as `done` wants, so that a client reads its own write on its next request; returns the
/// instance as last seen.
pub(crate) async fn settle(
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

pub(crate) fn check_service_name(name: &str) -> Result<(), ApiError> {
    Service::new(name, "x", 1)
        .validate()
        .map_err(|error| ApiError::bad_request(error.to_string()))
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
