//! Seeds given by host name (`grapevine:7946`, `node1:7946`): resolved through the system
//! resolver at start, and again and again while the node has no live peer.
//!
//! In containers the addresses behind a name change: a restarted container may get another
//! IP, and a Kubernetes headless Service or a Docker network alias lists only the replicas
//! that are running right now. So a name is not resolved once and forgotten (as a plain
//! `IP:PORT` seed is fixed): a resolver task re-resolves every name on the join-retry period
//! for as long as the node is alone, and the driver joins through whatever the names resolve
//! to at that moment. Once the node has a peer, membership keeps it in the cluster and DNS
//! is left alone.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::View;

/// Longest accepted host name (RFC 1035's 253 characters for a full domain name).
const MAX_HOST_LEN: usize = 253;

/// Addresses kept from one seed name (a headless Service lists one per replica).
const MAX_ADDRS_PER_NAME: usize = 64;

/// A seed given as `HOST:PORT`, resolved through the system resolver (e.g. DNS).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeedName {
    host: String,
    port: u16,
}

/// A seed that is not `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed {text:?} is not HOST:PORT: {reason}")]
pub struct InvalidSeed {
    /// What was given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl SeedName {
    /// The host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::fmt::Display for SeedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for SeedName {
    type Err = InvalidSeed;

    fn from_str(text: &str) -> Result<Self, InvalidSeed> {
        let invalid = |reason| InvalidSeed {
            text: text.to_string(),
            reason,
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(invalid("the port is not a number from 1 to 65535"));
        }
        if host.is_empty() {
            return Err(invalid("no host name"));
        }
        if host.len() > MAX_HOST_LEN {
            return Err(invalid("the host name is longer than 253 bytes"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(invalid(
                "the host name may hold only letters, digits, '.', '-' and '_' (IPv6 goes in brackets)",
            ));
        }
        Ok(SeedName {
            host: host.to_string(),
            port,
        })
    }
}

/// What a node joins through: fixed addresses plus the latest resolution of its names.
pub(crate) struct Seeds {
    fixed: Vec<SocketAddr>,
    resolved: Option<watch::Receiver<Vec<SocketAddr>>>,
}

impl Seeds {
    /// Seeds given as addresses only.
    pub(crate) fn fixed(fixed: Vec<SocketAddr>) -> Self {
        Seeds {
            fixed,
            resolved: None,
        }
    }

    /// Fixed addresses and the addresses a resolver task publishes.
    pub(crate) fn with_names(
        fixed: Vec<SocketAddr>,
        resolved: watch::Receiver<Vec<SocketAddr>>,
    ) -> Self {
        Seeds {
            fixed,
            resolved: Some(resolved),
        }
    }

    /// Every seed address right now: the fixed ones first, then the resolved ones, each once.
    pub(crate) fn current(&self) -> Vec<SocketAddr> {
        let mut seen = BTreeSet::new();
        let resolved = self
            .resolved
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default();
        self.fixed
            .iter()
            .chain(resolved.iter())
            .copied()
            .filter(|addr| seen.insert(*addr))
            .collect()
    }
}

/// Resolves one name through the system resolver, bounded by `timeout`.
pub(crate) async fn system_resolve(
    name: SeedName,
    timeout: Duration,
) -> std::io::Result<Vec<SocketAddr>> {
    let lookup = tokio::net::lookup_host((name.host.as_str(), name.port));
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, lookup)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
        })??
        .take(MAX_ADDRS_PER_NAME)
        .collect();
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name has no address",
        ));
    }
    Ok(addrs)
}

/// Resolves every name with `resolve`; failures are logged (a warning the first time a name
/// fails, then quietly until it resolves again) and leave that name out.
pub(crate) async fn resolve_all<R, F>(
    names: &[SeedName],
    resolve: &R,
    failing: &mut BTreeSet<SeedName>,
) -> Vec<SocketAddr>
where
    R: Fn(SeedName) -> F,
    F: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let mut all = BTreeSet::new();
    for name in names {
        match resolve(name.clone()).await {
            Ok(addrs) => {
                if failing.remove(name) {
                    tracing::info!(seed = %name, ?addrs, "seed name resolves again");
                } else {
                    tracing::debug!(seed = %name, ?addrs, "seed name resolved");
                }
                all.extend(addrs);
            }
            Err(error) => {
                if failing.insert(name.clone()) {
                    tracing::warn!(
                        seed = %name,
                        %error,
                        "cannot resolve seed name; retrying while this node has no peer"
                    );
                } else {
                    tracing::debug!(seed = %name, %error, "seed name still unresolved");
                }
            }
        }
    }
    all.into_iter().collect()
}

/// Whether the view shows a live member other than the node itself.
fn has_peers(view: &View) -> bool {
    view.members
        .iter()
        .any(|m| m.name != view.identity.name && m.status.is_active())
}

/// Re-resolves `names` every `period` while the node has no live peer, publishing the
/// addresses to the driver. Ends when the node stops (its view is dropped).
pub(crate) async fn keep_resolving<R, F>(
    names: Vec<SeedName>,
    resolve: R,
    mut view: watch::Receiver<Arc<View>>,
    resolved: watch::Sender<Vec<SocketAddr>>,
    period: Duration,
    mut failing: BTreeSet<SeedName>,
) where
    R: Fn(SeedName) -> F,
    F: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    loop {
        tokio::time::sleep(period).await;
        // Wait (without polling DNS) while the node is in a cluster.
        loop {
            // A closed view means the driver has stopped.
            if view.has_changed().is_err() {
                return;
            }
            if !has_peers(&view.borrow_and_update()) {
                break;
            }
            if view.changed().await.is_err() {
                return;
            }
        }
        let addrs = resolve_all(&names, &resolve, &mut failing).await;
        resolved.send_if_modified(|current| {
            let changed = *current != addrs;
            if changed {
                tracing::debug!(?addrs, "seed addresses changed");
                *current = addrs;
            }
            changed
        });
        if resolved.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Member, MemberStatus, NodeId};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn parses_host_and_port() {
        let seed: SeedName = "grapevine-0.grapevine.default.svc.cluster.local:7946"
            .parse()
            .unwrap();
        assert_eq!(
            seed.host(),
            "grapevine-0.grapevine.default.svc.cluster.local"
        );
        assert_eq!(seed.port(), 7946);
        assert_eq!(
            seed.to_string(),
            "grapevine-0.grapevine.default.svc.cluster.local:7946"
        );
    }

    #[test]
    fn refuses_what_is_not_host_port() {
        for (text, reason) in [
            ("grapevine", "no port"),
            ("grapevine:", "the port is not a number from 1 to 65535"),
            ("grapevine:0", "the port is not a number from 1 to 65535"),
            ("grapevine:70000", "the port is not a number from 1 to 65535"),
            (":7946", "no host name"),
            ("::1:7946", "the host name may hold only letters, digits, '.', '-' and '_' (IPv6 goes in brackets)"),
            ("bad host:7946", "the host name may hold only letters, digits, '.', '-' and '_' (IPv6 goes in brackets)"),
        ] {
            let error = text.parse::<SeedName>().unwrap_err();
            assert_eq!(error.reason, reason, "{text}");
            assert!(error.to_string().contains(text), "{error}");
        }
        let long = format!("{}:1", "a".repeat(254));
        assert_eq!(
            long.parse::<SeedName>().unwrap_err().reason,
            "the host name is longer than 253 bytes"
        );
    }

    #[test]
    fn current_lists_fixed_then_resolved_once_each() {
        let a: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7946".parse().unwrap();
        let (tx, rx) = watch::channel(vec![b, a]);
        let seeds = Seeds::with_names(vec![a], rx);
        assert_eq!(seeds.current(), vec![a, b]);
        tx.send_replace(Vec::new());
        assert_eq!(seeds.current(), vec![a]);
        assert_eq!(Seeds::fixed(vec![b]).current(), vec![b]);
    }

    /// A name the resolver refuses without asking any server: a 64-byte label is longer
    /// than DNS allows, and `.invalid` never resolves (RFC 2606).
    pub(crate) fn unresolvable() -> SeedName {
        format!("{}.invalid:7946", "a".repeat(64)).parse().unwrap()
    }

    #[tokio::test]
    async fn localhost_resolves_and_a_bad_name_is_left_out() {
        let mut failing = BTreeSet::new();
        let names: Vec<SeedName> = vec!["localhost:7946".parse().unwrap(), unresolvable()];
        let resolve = |name| system_resolve(name, Duration::from_secs(10));
        let addrs = resolve_all(&names, &resolve, &mut failing).await;
        assert!(!addrs.is_empty());
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 7946));
        assert_eq!(failing.len(), 1);
        assert!(failing.contains(&names[1]));
    }

    fn view(members: &[(&str, MemberStatus)]) -> Arc<View> {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let member = |name: &str, status| Member {
            name: name.to_string(),
            addr,
            status,
            generation: 1,
        };
        Arc::new(View {
            identity: NodeId {
                name: "me".into(),
                addr,
                generation: 1,
            },
            members: std::iter::once(member("me", MemberStatus::Alive))
                .chain(members.iter().map(|(name, status)| member(name, *status)))
                .collect(),
            profile: crate::membership::Profile::Local,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn names_are_resolved_again_only_while_alone() {
        let first: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        let moved: SocketAddr = "10.0.0.2:7946".parse().unwrap();
        // The seed "moves" after the third lookup, like a restarted container.
        let lookups = Arc::new(AtomicUsize::new(0));
        let counter = lookups.clone();
        let resolve = move |_name: SeedName| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(vec![if n < 3 { first } else { moved }]) }
        };
        let (view_tx, view_rx) = watch::channel(view(&[]));
        let (resolved_tx, mut resolved_rx) = watch::channel(vec![first]);
        let period = Duration::from_secs(1);
        let task = tokio::spawn(keep_resolving(
            vec!["seed:7946".parse().unwrap()],
            resolve,
            view_rx,
            resolved_tx,
            period,
            BTreeSet::new(),
        ));
        // Alone: looked up every period; the new address is published.
        tokio::time::timeout(
            Duration::from_secs(10),
            resolved_rx.wait_for(|a| a == &[moved]),
        )
        .await
        .expect("the moved seed is published")
        .unwrap();
        // With a live peer (a suspect one counts): no more lookups.
        view_tx.send_replace(view(&[("peer", MemberStatus::Suspect)]));
        tokio::time::sleep(period * 2).await;
        let settled = lookups.load(Ordering::SeqCst);
        tokio::time::sleep(period * 10).await;
        assert_eq!(lookups.load(Ordering::SeqCst), settled);
        // A down peer does not count: alone again, lookups resume.
        view_tx.send_replace(view(&[("peer", MemberStatus::Down)]));
        tokio::time::sleep(period * 3).await;
        assert!(lookups.load(Ordering::SeqCst) >= settled + 2);
        // The node stops: the task ends.
        drop(view_tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the resolver ends with its node")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_name_is_retried_and_keeps_the_others() {
        let good: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let resolve = move |name: SeedName| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if name.host() == "good" {
                    Ok(vec![good])
                } else {
                    Err(std::io::Error::other("no such host"))
                }
            }
        };
        let names: Vec<SeedName> = vec!["bad:1".parse().unwrap(), "good:7946".parse().unwrap()];
        let mut failing = BTreeSet::new();
        assert_eq!(
            resolve_all(&names, &resolve, &mut failing).await,
            vec![good]
        );
        assert_eq!(failing.len(), 1);
        assert_eq!(
            resolve_all(&names, &resolve, &mut failing).await,
            vec![good]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
