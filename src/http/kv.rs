//! Consul's KV endpoints over the replicated config store.
//!
//! Entries are Consul's (`LockIndex`, `Key`, `Flags`, base64 `Value`, `CreateIndex`,
//! `ModifyIndex`); indexes are this agent's config change seqs (local, monotonic). Prefixes
//! are plain strings as in Consul (`app` lists `app/x` and `apple`). Writes are
//! last-writer-wins: `?cas`, `?acquire`, `?release` (and sessions) need consensus, which
//! grapevine does not have, so they are refused with a 400 that says so.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;

use super::api::{answer, block_config, body_bytes};
use super::consul::params;
use super::query::Params;
use super::{ApiError, AppState, INDEX_HEADER};
use crate::state::config::{validate_key, KeyValue, MAX_KEY_LEN};

type Shared = State<Arc<AppState>>;

/// Keys one request lists or deletes at most.
const MAX_LISTED: usize = 100_000;

/// Consul's `KVPair`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvPair {
    lock_index: u64,
    key: String,
    flags: u64,
    /// Base64; `null` for an empty value, as Consul.
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
}

impl From<KeyValue> for KvPair {
    fn from(kv: KeyValue) -> Self {
        KvPair {
            lock_index: 0,
            flags: kv.flags,
            value: (!kv.value.is_empty())
                .then(|| base64::engine::general_purpose::STANDARD.encode(&kv.value)),
            key: kv.key,
            create_index: kv.indexes.create,
            modify_index: kv.indexes.modify,
        }
    }
}

fn consensus_refused(what: &str) -> ApiError {
    ApiError::bad_request(format!(
        "?{what} is not supported: it needs consensus (a linearizable compare-and-set or a \
         lock), and grapevine's KV is eventually consistent, last writer wins; give each key \
         a single writer instead"
    ))
}

fn check_key(key: &str) -> Result<(), ApiError> {
    validate_key(key).map_err(|error| ApiError::bad_request(error.to_string()))
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

const READ_PARAMS: &[&str] = &["recurse", "keys", "separator", "raw"];

pub(crate) async fn get_root(state: Shared, query: RawQuery) -> Result<Response, ApiError> {
    read(state, String::new(), query).await
}

pub(crate) async fn get(
    state: Shared,
    Path(key): Path<String>,
    query: RawQuery,
) -> Result<Response, ApiError> {
    read(state, key, query).await
}

async fn read(
    State(state): Shared,
    key: String,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(&state, query.as_deref(), READ_PARAMS, true)?;
    let recurse = params.flag("recurse")?;
    let keys_only = params.flag("keys")?;
    let raw = params.flag("raw")?;
    let config = state.node.config();
    if keys_only || recurse {
        check_prefix(&key)?;
        let index = block_config(&state, &params, &key, |k| k.starts_with(key.as_str())).await?;
        let found = config.scan(&key, MAX_LISTED);
        if keys_only {
            let keys = roll_up(&key, params.string("separator"), found);
            if keys.is_empty() {
                return Err(ApiError::not_found("").with_index(index));
            }
            return Ok(answer(&params, index, &keys));
        }
        if found.is_empty() {
            return Err(ApiError::not_found("").with_index(index));
        }
        let pairs: Vec<KvPair> = found.into_iter().map(KvPair::from).collect();
        return Ok(answer(&params, index, &pairs));
    }
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "Missing key name: give /v1/kv/KEY, or ?recurse or ?keys to list",
        ));
    }
    check_key(&key)?;
    let index = block_config(&state, &params, &key, |k| k == key).await?;
    let Some(entry) = config.get_entry(&key) else {
        return Err(ApiError::not_found("").with_index(index));
    };
    if raw {
        let mut response = (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            entry.value,
        )
            .into_response();
        response
            .headers_mut()
            .insert(INDEX_HEADER, HeaderValue::from(index));
        return Ok(response);
    }
    Ok(answer(&params, index, &[KvPair::from(entry)]))
}

/// `?keys&separator=/`: each key below the prefix up to and including the first separator
/// after it, once (Consul's folder listing).
fn roll_up(prefix: &str, separator: Option<&str>, found: Vec<KeyValue>) -> Vec<String> {
    let mut keys = BTreeSet::new();
    for kv in found {
        let key = match separator.filter(|s| !s.is_empty()) {
            Some(sep) => match kv.key[prefix.len()..].find(sep) {
                Some(at) => kv.key[..prefix.len() + at + sep.len()].to_string(),
                None => kv.key,
            },
            None => kv.key,
        };
        keys.insert(key);
    }
    keys.into_iter().collect()
}

fn write_params(state: &AppState, query: Option<&str>, own: &[&str]) -> Result<Params, ApiError> {
    let mut allowed = vec!["cas", "acquire", "release"];
    allowed.extend_from_slice(own);
    let params = params(state, query, &allowed, false)?;
    for refused in ["cas", "acquire", "release"] {
        if params.has(refused) {
            return Err(consensus_refused(refused));
        }
    }
    Ok(params)
}

pub(crate) async fn put_root(
    State(state): Shared,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    write_params(&state, query.as_deref(), &["flags"])?;
    Err(ApiError::bad_request("Missing key name"))
}

pub(crate) async fn put(
    State(state): Shared,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let params = write_params(&state, query.as_deref(), &["flags"])?;
    // Consul's `Flags`: an opaque number stored, replicated and persisted with the value.
    let flags = match params.string("flags") {
        None => 0,
        Some(flags) => flags.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("flags={flags:?} is not an unsigned 64-bit integer"))
        })?,
    };
    check_key(&key)?;
    let value = body_bytes(body)?;
    let change = state
        .node
        .config()
        .set_with_flags(&key, value.to_vec(), flags)
        .await?;
    Ok(answer(&params, change.seq, &true))
}

pub(crate) async fn delete_root(state: Shared, query: RawQuery) -> Result<Response, ApiError> {
    delete_at(state, String::new(), query).await
}

pub(crate) async fn delete(
    state: Shared,
    Path(key): Path<String>,
    query: RawQuery,
) -> Result<Response, ApiError> {
    delete_at(state, key, query).await
}

async fn delete_at(
    State(state): Shared,
    key: String,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = write_params(&state, query.as_deref(), &["recurse"])?;
    let config = state.node.config();
    if params.flag("recurse")? {
        check_prefix(&key)?;
        for kv in config.scan(&key, MAX_LISTED) {
            config.delete(&kv.key).await?;
        }
    } else {
        if key.is_empty() {
            return Err(ApiError::bad_request(
                "Missing key name: give /v1/kv/KEY, or ?recurse to delete every key",
            ));
        }
        check_key(&key)?;
        // Deleting an absent key succeeds, as in Consul.
        config.delete(&key).await?;
    }
    Ok(answer(&params, config.current_seq(), &true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::config::LocalIndexes;

    fn kv(key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: vec![],
            flags: 0,
            indexes: LocalIndexes {
                create: 1,
                modify: 1,
            },
        }
    }

    #[test]
    fn keys_roll_up_at_the_separator() {
        let found = || vec![kv("web/a"), kv("web/b/c"), kv("web/b/d"), kv("webx")];
        let below: Vec<KeyValue> = found()
            .into_iter()
            .filter(|k| k.key.starts_with("web/"))
            .collect();
        assert_eq!(roll_up("web/", Some("/"), below), ["web/a", "web/b/"]);
        assert_eq!(roll_up("web", Some("/"), found()), ["web/", "webx"]);
        assert_eq!(roll_up("", None, found()).len(), 4);
    }
}
