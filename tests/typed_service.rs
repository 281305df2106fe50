//! Typed services (`#[grapevine::service]`) between in-process nodes on loopback.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use grapevine::rpc::{CallError, ServiceError};
use grapevine::{AppError, Node, RpcError, RpcService};
use serde::{Deserialize, Serialize};

mod common;

use common::{cluster, instances_visible};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    key: String,
    value: u64,
}

/// The store's own error type, mapped to the dynamic layer's `AppError` by code.
#[derive(Debug, Clone, PartialEq)]
enum KvError {
    Missing(String),
    Other(AppError),
}

impl ServiceError for KvError {
    fn into_app_error(self) -> AppError {
        match self {
            KvError::Missing(key) => AppError::new(404, key),
            KvError::Other(error) => error,
        }
    }

    fn from_app_error(error: AppError) -> Self {
        match error.code {
            404 => KvError::Missing(error.message),
            _ => KvError::Other(error),
        }
    }
}

/// A key-value store served over RPC.
#[grapevine::service(name = "kv")]
trait Store {
    /// The value of `key`.
    #[rpc(idempotent)]
    async fn get(&self, key: String) -> Result<u64, KvError>;
    /// Sets `key`; the value it had.
    async fn put(&self, key: String, value: u64) -> Result<Option<u64>, KvError>;
    /// Every entry, in key order.
    #[rpc(idempotent, name = "list")]
    async fn entries(&self) -> Result<Vec<Entry>, KvError>;
    /// The node that answered.
    async fn node(&self) -> Result<String, AppError>;
}

/// No service name given: the trait's name in snake case.
#[grapevine::service]
pub trait NamePicker {
    async fn pick(&self, turn: u32) -> Result<String, AppError>;
    /// Arguments named like the generated code's locals still compile.
    async fn shadow(
        &self,
        server: String,
        request: u32,
        check: bool,
        result: u8,
    ) -> Result<(), AppError>;
}

struct MemStore {
    node: String,
    data: Mutex<BTreeMap<String, u64>>,
}

impl MemStore {
    fn new(node: &Node) -> MemStore {
        MemStore {
            node: node.identity().name,
            data: Mutex::new(BTreeMap::new()),
        }
    }

    fn data(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemStore {
    async fn get(&self, key: String) -> Result<u64, KvError> {
        self.data().get(&key).copied().ok_or(KvError::Missing(key))
    }

    async fn put(&self, key: String, value: u64) -> Result<Option<u64>, KvError> {
        if key.is_empty() {
            return Err(KvError::Other(AppError::new(400, "an empty key")));
        }
        // A handler that waits before answering, so that the call is not answered inline.
        tokio::task::yield_now().await;
        Ok(self.data().insert(key, value))
    }

    async fn entries(&self) -> Result<Vec<Entry>, KvError> {
        Ok(self
            .data()
            .iter()
            .map(|(key, value)| Entry {
                key: key.clone(),
                value: *value,
            })
            .collect())
    }

    async fn node(&self) -> Result<String, AppError> {
        Ok(self.node.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_round_trip_app_errors_and_dynamic_callers() {
    let nodes = cluster(2).await;
    let server = &nodes[1];
    server
        .serve(MemStore::new(server).into_service())
        .await
        .unwrap();
    assert_eq!(StoreClient::SERVICE, "kv");
    assert_eq!(NamePickerClient::SERVICE, "name_picker");
    instances_visible(&nodes[0], "kv", 1).await;
    let client = StoreClient::new(&nodes[0]);

    // Every shape of method: several arguments, one, none; a renamed one.
    assert_eq!(client.put("b".into(), 2).await, Ok(None));
    assert_eq!(client.put("a".into(), 1).await, Ok(None));
    assert_eq!(client.put("a".into(), 10).await, Ok(Some(1)));
    assert_eq!(client.get("a".into()).await, Ok(10));
    assert_eq!(
        client.entries().await.unwrap(),
        vec![
            Entry {
                key: "a".into(),
                value: 10
            },
            Entry {
                key: "b".into(),
                value: 2
            }
        ]
    );
    assert_eq!(client.node().await.unwrap(), "node-1");

    // Application errors come back in the service's type, by variant.
    assert_eq!(
        client.get("nope".into()).await,
        Err(CallError::App(KvError::Missing("nope".into())))
    );
    assert_eq!(
        client.put(String::new(), 1).await,
        Err(CallError::App(KvError::Other(AppError::new(
            400,
            "an empty key"
        ))))
    );

    // The wire is the dynamic layer's: one argument is the plain value, several a tuple,
    // none `()`; the renamed method is called by its wire name; errors are `AppError`s.
    let dynamic = nodes[0].client("kv");
    assert_eq!(dynamic.call::<_, u64>("get", "a").await, Ok(10));
    assert_eq!(
        dynamic.call::<_, Option<u64>>("put", &("c", 3u64)).await,
        Ok(None)
    );
    let listed: Vec<Entry> = dynamic.call("list", &()).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(
        dynamic.call::<_, u64>("get", "nope").await,
        Err(RpcError::Remote(AppError::new(404, "nope")))
    );
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_servers_fail_as_not_found_or_protocol_errors() {
    let nodes = cluster(2).await;
    // A server of `kv` written against another version of the trait: `get` takes a number
    // and `node` is missing.
    let other = RpcService::new("kv")
        .method("get", |key: u64| async move { Ok::<_, AppError>(key) })
        .method("put", |(_, value): (String, u64)| async move {
            Ok::<_, AppError>(Some(value))
        });
    nodes[1].serve(other).await.unwrap();
    instances_visible(&nodes[0], "kv", 1).await;
    let client = StoreClient::new(&nodes[0]);
    assert_eq!(client.put("k".into(), 7).await, Ok(Some(7)));
    match client.node().await {
        Err(CallError::Rpc(RpcError::NotFound(what))) => assert!(what.contains("node"), "{what}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // The string does not decode as the number the server wants.
    match client.get("key-of-a-string".into()).await {
        Err(CallError::Rpc(RpcError::Protocol(_))) => {}
        other => panic!("expected a protocol error, got {other:?}"),
    }
    // A service nobody serves.
    let nobody = NamePickerClient::new(&nodes[0]);
    match nobody.pick(1).await {
        Err(CallError::Rpc(RpcError::NoInstances(name))) => assert_eq!(name, "name_picker"),
        other => panic!("expected NoInstances, got {other:?}"),
    }
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_methods_marked_idempotent_are_hedged() {
    let nodes = cluster(3).await;
    for node in &nodes[1..] {
        node.serve(MemStore::new(node).into_service())
            .await
            .unwrap();
    }
    instances_visible(&nodes[0], "kv", 2).await;
    let client = StoreClient::new(&nodes[0]).with(|c| c.hedge(Duration::from_millis(200)));
    // `put` is not idempotent: the client refuses to hedge it (it might run twice).
    match client.put("k".into(), 1).await {
        Err(CallError::Rpc(RpcError::InvalidCall(_))) => {}
        other => panic!("expected InvalidCall, got {other:?}"),
    }
    // `get` and `list` are: they go through.
    assert!(matches!(
        client.get("k".into()).await,
        Err(CallError::App(KvError::Missing(_)))
    ));
    assert_eq!(client.entries().await, Ok(vec![]));
    // `node` is not marked, so it is not hedged either.
    assert!(matches!(
        client.node().await,
        Err(CallError::Rpc(RpcError::InvalidCall(_)))
    ));
    for node in &nodes {
        node.shutdown().await;
    }
}
