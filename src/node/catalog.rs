//! Reading the service catalog: lookups, queries and watches over the node's published view.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::membership::{Member, MemberStatus};
use crate::state::catalog::{Catalog, Health};

/// One instance of a service, as the catalog and membership see it together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Service name.
    pub service: String,
    /// Instance id, unique on its node.
    pub id: String,
    /// Name of the node that registered it.
    pub node: String,
    /// Address to reach it at (the node's advertised IP unless the service gave its own).
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// Health reported by the owning node's checks.
    pub health: Health,
    /// Liveness of the owning node.
    pub node_status: MemberStatus,
}

impl Instance {
    /// `addr:port` of the instance.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addr, self.port)
    }
}

/// A lookup with filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only instances carrying every one of these tags.
    pub tags: Vec<String>,
    /// Also return instances whose health is `warning` or `critical`.
    pub include_unhealthy: bool,
}

impl Query {
    /// Requires a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Includes instances that are not passing.
    pub fn include_unhealthy(mut self) -> Self {
        self.include_unhealthy = true;
        self
    }

    fn matches(&self, instance: &Instance) -> bool {
        // Instances of failed or departed nodes never answer a lookup.
        instance.node_status.is_active()
            && (self.include_unhealthy || instance.health == Health::Passing)
            && self.tags.iter().all(|t| instance.tags.contains(t))
    }
}

/// Summary of one service across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Instances on live nodes.
    pub instances: usize,
    /// Of those, how many are passing.
    pub passing: usize,
}

/// This node's local indexes of one catalog record (an instance or a node): the catalog
/// [`CatalogHandle::index`] at which it appeared, at which its registration (or a node's
/// address) last changed, and at which its health (or a node's liveness) last changed. They
/// are what Consul's `CreateIndex` and `ModifyIndex` mean on one agent: monotonic, local to
/// this node and this run of it, not replicated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordIndexes {
    /// Index at which the record appeared (again, after it was gone).
    pub create: u64,
    /// Index of the last change of the registration (or the node's address).
    pub modify: u64,
    /// Index of the last change of the health (or the node's liveness).
    pub health: u64,
}

/// What a node's indexes follow: its address and generation, and its liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeMark {
    addr: std::net::SocketAddr,
    generation: u64,
    status: MemberStatus,
    indexes: RecordIndexes,
}

/// The catalog joined with membership, published by the driver after every change.
#[derive(Debug, Default)]
pub(crate) struct CatalogView {
    /// How many views the driver has published before this one plus one: a monotonic index
    /// of the applied catalog and membership changes (0 before the first).
    pub(crate) index: u64,
    /// Instances by service name, sorted by node then id.
    pub(crate) services: BTreeMap<String, Vec<Instance>>,
    /// Local indexes of every instance, by node then id.
    indexes: BTreeMap<(String, String), RecordIndexes>,
    /// Local indexes of every member listed, by name.
    nodes: BTreeMap<String, NodeMark>,
}

impl CatalogView {
    /// Joins the catalog's records with the member list. Records of owners not (yet) in
    /// the member list are left out: their address and liveness are unknown.
    pub(crate) fn build(catalog: &Catalog, members: &[Member]) -> Self {
        let by_name: BTreeMap<&str, &Member> =
            members.iter().map(|m| (m.name.as_str(), m)).collect();
        let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for (owner, state) in catalog.owners() {
            let Some(member) = by_name.get(owner.as_str()) else {
                continue;
            };
            for record in state.records() {
                let service = &record.service;
                services
                    .entry(service.name.clone())
                    .or_default()
                    .push(Instance {
                        service: service.name.clone(),
                        id: service.id.clone(),
                        node: owner.clone(),
                        addr: service.addr.unwrap_or(member.addr.ip()),
                        port: service.port,
                        tags: service.tags.clone(),
                        meta: service.meta.clone(),
                        health: record.health,
                        node_status: member.status,
                    });
            }
        }
        let nodes = members
            .iter()
            .map(|m| {
                let mark = NodeMark {
                    addr: m.addr,
                    generation: m.generation,
                    status: m.status,
                    indexes: RecordIndexes::default(),
                };
                (m.name.clone(), mark)
            })
            .collect();
        CatalogView {
            index: 0,
            services,
            indexes: BTreeMap::new(),
            nodes,
        }
    }

    /// Sets this view's `index` to `index` and its records' indexes from `previous`: kept
    /// where a record did not change, moved to `index` where it changed or appeared.
    pub(crate) fn carry_indexes(&mut self, previous: &CatalogView, index: u64) {
        self.index = index;
        let before: BTreeMap<(&str, &str), &Instance> = previous
            .services
            .values()
            .flatten()
            .map(|i| ((i.node.as_str(), i.id.as_str()), i))
            .collect();
        let fresh = RecordIndexes {
            create: index,
            modify: index,
            health: index,
        };
        for instance in self.services.values().flatten() {
            let key = (instance.node.as_str(), instance.id.as_str());
            let owned = (instance.node.clone(), instance.id.clone());
            let indexes = match (before.get(&key), previous.indexes.get(&owned)) {
                (Some(old), Some(kept)) => {
                    let registration_changed = old.service != instance.service
                        || old.addr != instance.addr
                        || old.port != instance.port
                        || old.tags != instance.tags
                        || old.meta != instance.meta;
                    let health_changed =
                        old.health != instance.health || old.node_status != instance.node_status;
                    RecordIndexes {
                        create: kept.create,
                        modify: if registration_changed {
                            index
                        } else {
                            kept.modify
                        },
                        health: if health_changed || registration_changed {
                            index
                        } else {
                            kept.health
                        },
                    }
                }
                _ => fresh,
            };
            self.indexes.insert(owned, indexes);
        }
        for (name, mark) in &mut self.nodes {
            mark.indexes = match previous.nodes.get(name) {
                Some(old) => {
                    let moved = old.addr != mark.addr || old.generation != mark.generation;
                    RecordIndexes {
                        create: old.indexes.create,
                        modify: if moved { index } else { old.indexes.modify },
                        health: if moved || old.status != mark.status {
                            index
                        } else {
                            old.indexes.health
                        },
                    }
                }
                None => fresh,
            };
        }
    }

    pub(crate) fn query(&self, name: &str, query: &Query) -> Vec<Instance> {
        self.services
            .get(name)
            .map(|all| all.iter().filter(|i| query.matches(i)).cloned().collect())
            .unwrap_or_default()
    }
}

/// Read access to the catalog of a node. Cheap to clone; never blocks the node.
#[derive(Debug, Clone)]
pub struct CatalogHandle {
    pub(crate) view: watch::Receiver<Arc<CatalogView>>,
}

impl CatalogHandle {
    /// Passing instances of `service` on live nodes.
    pub fn lookup(&self, service: &str) -> Vec<Instance> {
        self.lookup_with(service, &Query::default())
    }

    /// Instances of `service` that match `query`.
    pub fn lookup_with(&self, service: &str, query: &Query) -> Vec<Instance> {
        self.view.borrow().query(service, query)
    }

    /// Every service with at least one instance on a live node.
    pub fn services(&self) -> BTreeMap<String, ServiceSummary> {
        let view = self.view.borrow();
        let mut out = BTreeMap::new();
        for (name, instances) in &view.services {
            let live: Vec<_> = instances
                .iter()
                .filter(|i| i.node_status.is_active())
                .collect();
            if live.is_empty() {
                continue;
            }
            out.insert(
                name.clone(),
                ServiceSummary {
                    instances: live.len(),
                    passing: live.iter().filter(|i| i.health == Health::Passing).count(),
                },
            );
        }
        out
    }

    /// Every known instance, those of down or left nodes included (see `node_status`).
    pub fn all_instances(&self) -> Vec<Instance> {
        self.view
            .borrow()
            .services
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// Every known instance (as [`Self::all_instances`]) with its local indexes, and the
    /// local indexes of every listed member by name, read from one view so that they agree.
    pub fn all_instances_with_indexes(
        &self,
    ) -> (
        Vec<(Instance, RecordIndexes)>,
        BTreeMap<String, RecordIndexes>,
    ) {
        let view = self.view.borrow();
        let instances = view
            .services
            .values()
            .flatten()
            .map(|i| {
                let key = (i.node.clone(), i.id.clone());
                (
                    i.clone(),
                    view.indexes.get(&key).copied().unwrap_or_default(),
                )
            })
            .collect();
        let nodes = view
            .nodes
            .iter()
            .map(|(name, mark)| (name.clone(), mark.indexes))
            .collect();
        (instances, nodes)
    }

    /// A monotonic index of the catalog changes this node applied (registrations, health
    /// changes, members joining, failing or leaving); it grows by one per published view.
    /// Local to this node and this run of it.
    pub fn index(&self) -> u64 {
        self.view.borrow().index
    }

    /// Waits until [`Self::index`] passes `after` and returns the new index; `None` once
    /// the node has stopped. Bound the wait with a timeout.
    pub async fn wait_past(&self, after: u64) -> Option<u64> {
        let mut view = self.view.clone();
        loop {
            let index = view.borrow_and_update().index;
            if index > after {
                return Some(index);
            }
            view.changed().await.ok()?;
        }
    }

    /// Watches the passing instances of `service`.
    pub fn watch(&self, service: &str) -> ServiceWatch {
        self.watch_with(service, Query::default())
    }

    /// Watches the instances of `service` that match `query`.
    pub fn watch_with(&self, service: &str, query: Query) -> ServiceWatch {
        ServiceWatch {
            view: self.view.clone(),
            service: service.to_string(),
            query,
            last: None,
        }
    }
}

/// Whether two instance sets differ only in their nodes' alive/suspect status, which a
/// watcher need not act on (suspect nodes' instances still answer lookups).
fn same_instances(a: &[Instance], b: &[Instance]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Instance {
                node_status: y.node_status,
                ..x.clone()
            } == *y
        })
}

/// The instance set of a service, yielded anew on every change. Latest-value semantics: a
/// slow reader skips intermediate states and never makes anything queue up.
#[derive(Debug)]
pub struct ServiceWatch {
    view: watch::Receiver<Arc<CatalogView>>,
    service: String,
    query: Query,
    last: Option<Vec<Instance>>,
}

impl ServiceWatch {
    /// The current set on the first call, then the next different set; `None` once the
    /// node has stopped.
    pub async fn next(&mut self) -> Option<Vec<Instance>> {
        loop {
            let current = self
                .view
                .borrow_and_update()
                .query(&self.service, &self.query);
            if !self
                .last
                .as_ref()
                .is_some_and(|last| same_instances(last, &current))
            {
                self.last = Some(current.clone());
                return Some(current);
            }
            self.view.changed().await.ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_only_changes_are_the_same_set() {
        let a = Instance {
            service: "web".into(),
            id: "w".into(),
            node: "n".into(),
            addr: "127.0.0.1".parse().unwrap(),
            port: 1,
            tags: vec![],
            meta: BTreeMap::new(),
            health: Health::Passing,
            node_status: MemberStatus::Alive,
        };
        let b = Instance {
            node_status: MemberStatus::Suspect,
            ..a.clone()
        };
        assert!(same_instances(std::slice::from_ref(&a), &[b]));
        let c = Instance {
            health: Health::Critical,
            ..a.clone()
        };
        assert!(!same_instances(&[a], &[c]));
    }
}
