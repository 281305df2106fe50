//! RPC as a node offers it: serving services (listed in the catalog), calling them through
//! the catalog, and the built-in methods every node serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::catalog::CatalogHandle;
use super::Node;
use crate::error::Result;
use crate::membership::MemberStatus;
use crate::rpc::{
    Endpoint, Resolve, RpcClient, RpcError, RpcService, ServiceClient, ServiceSnapshot,
};
use crate::state::catalog::Service;

/// Tag of catalog instances that are RPC services served by grapevine.
pub const RPC_TAG: &str = "rpc";

/// Answer of the built-in `grapevine.ping` method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The answering node's name.
    pub node: String,
    /// Its wall clock, in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// Answer of the built-in `grapevine.info` method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Node name.
    pub node: String,
    /// Advertised address.
    pub addr: SocketAddr,
    /// Identity generation.
    pub generation: u64,
    /// Live members it sees (itself included).
    pub members_alive: usize,
    /// RPC services it serves.
    pub services: Vec<String>,
    /// grapevine's version.
    pub version: String,
}

/// Resolves services through the node's catalog: passing instances on alive nodes only
/// (a suspect node may be failing; its instances are skipped until it refutes).
pub(crate) struct CatalogResolver {
    pub(crate) catalog: CatalogHandle,
    pub(crate) local_name: String,
}

impl Resolve for CatalogResolver {
    fn resolve(&self, service: &str) -> Vec<Endpoint> {
        self.catalog
            .lookup(service)
            .into_iter()
            .filter(|i| i.node_status == MemberStatus::Alive)
            .map(|i| Endpoint {
                addr: i.socket_addr(),
                local: i.node == self.local_name,
            })
            .collect()
    }
}

impl Node {
    /// Serves `service` on this node's port and lists it in the catalog (tag `rpc`), so
    /// that clients anywhere in the cluster find it.
    pub async fn serve(&self, service: RpcService) -> Result<()> {
        let mut entry = Service::new(
            service.name(),
            format!("{}-rpc", service.name()),
            self.addr().port(),
        );
        entry.tags = vec![RPC_TAG.to_string()];
        entry.validate()?;
        self.shared.rpc.add(service);
        self.register(entry).await?;
        Ok(())
    }

    /// Stops serving `name` and removes it from the catalog.
    pub async fn stop_serving(&self, name: &str) -> Result<()> {
        self.shared.rpc.remove(name);
        self.deregister(&format!("{name}-rpc")).await
    }

    /// A client for `service`, resolved and balanced through the catalog.
    pub fn client(&self, service: &str) -> ServiceClient {
        self.rpc_client.service(service)
    }

    /// Calls `service.method` on the node at `addr` directly.
    pub async fn call_node<Req, Resp>(
        &self,
        addr: SocketAddr,
        service: &str,
        method: &str,
        request: &Req,
    ) -> Result<Resp, RpcError>
    where
        Req: Serialize + ?Sized,
        Resp: serde::de::DeserializeOwned,
    {
        self.rpc_client
            .call_addr(addr, service, method, request, crate::rpc::DEFAULT_TIMEOUT)
            .await
    }

    /// RPC calls this node is serving right now.
    pub fn rpc_in_flight(&self) -> usize {
        self.shared.rpc.in_flight()
    }

    /// Per-service RPC figures: the calls this node made (`client`) and served (`server`),
    /// with failures by kind and latency histograms.
    pub fn rpc_metrics(&self) -> Vec<ServiceSnapshot> {
        let mut figures = self.rpc_client.metrics();
        figures.extend(self.shared.rpc.metrics());
        figures
    }

    /// Names of the RPC services this node serves (the built-in one included).
    pub fn rpc_services(&self) -> Vec<String> {
        self.shared.rpc.names()
    }

    /// The RPC client of this node (connection pool shared by every service client).
    pub fn rpc_client(&self) -> &RpcClient {
        &self.rpc_client
    }
}

/// The methods every node serves under [`crate::rpc::BUILTIN_SERVICE`].
///
/// It holds only what it reads (never the node's shared state, which holds the registry
/// that holds this service: a cycle would keep the node's data dir locked after it stops).
pub(crate) fn builtin_service(shared: &super::Shared) -> RpcService {
    let (view, state) = (shared.view.clone(), shared.state.clone());
    let (info_view, registry) = (shared.view.clone(), Arc::downgrade(&shared.rpc));
    RpcService::new(crate::rpc::BUILTIN_SERVICE)
        .method("ping", move |(): ()| {
            let node = view.borrow().identity.name.clone();
            let time_ms = crate::sync::lock(&state).now_ms();
            async move { Ok(Pong { node, time_ms }) }
        })
        .method("info", move |(): ()| {
            let view = info_view.borrow().clone();
            let info = AgentInfo {
                node: view.identity.name.clone(),
                addr: view.identity.addr,
                generation: view.identity.generation,
                members_alive: view
                    .members
                    .iter()
                    .filter(|m| m.status == MemberStatus::Alive)
                    .count(),
                services: registry.upgrade().map(|r| r.names()).unwrap_or_default(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            };
            async move { Ok(info) }
        })
}

/// Default time a node waits for its in-flight calls when leaving.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(5);
