//! The TCP side of a node: push-pull exchanges and control requests.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

use super::control::{ControlRequest, ControlResponse, KeyOp, KeysReport, NodeInfo};
use super::driver::Command;
use super::protocol::{
    exchange, within, Request, Response, MAX_REQUESTS_PER_CONNECTION, RPC_VERSION,
};
use super::stats::Stats;
use super::Shared;
use crate::error::{Error, Result};
use crate::net::{Listener, Transport};
use crate::sync;
use crate::wire;

/// Most TCP connections served at once; more are closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

pub(crate) async fn serve<T: Transport>(listener: T::Listener, shared: Arc<Shared>, transport: T) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    Stats::add(&shared.stats.tcp_refused_busy, 1);
                    continue;
                };
                Stats::add(&shared.stats.tcp_accepted, 1);
                let shared = shared.clone();
                let transport = transport.clone();
                connections.spawn(async move {
                    if let Err(error) = handle(stream, peer, &shared, &transport).await {
                        Stats::add(&shared.stats.tcp_dropped, 1);
                        tracing::debug!(%peer, %error, "tcp connection dropped");
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: SocketAddr,
    /// Proved it holds the cluster's key.
    authenticated: bool,
    /// This node encrypts its traffic (so unauthenticated peers get control only).
    encrypted: bool,
}

async fn handle<T: Transport>(
    stream: T::Stream,
    addr: SocketAddr,
    shared: &Shared,
    transport: &T,
) -> Result<()> {
    let timeout = shared.view.borrow().profile.tcp_timeout();
    // The encryption handshake, if any, runs here: bounded, and off the accept loop.
    let stream = within(timeout, "handshake", async {
        transport
            .prepare_accepted(stream, addr)
            .await
            .map_err(|source| Error::Connect { addr, source })
    })
    .await?;
    let peer = Peer {
        addr,
        authenticated: T::is_authenticated(&stream),
        encrypted: transport.security().is_some(),
    };
    let mut framed = wire::framed_accepting(stream, shared.frame_budget.clone());
    if !hello(&mut framed, peer, shared, timeout).await? {
        return Ok(());
    }
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        // Every step is bounded, so a client that stalls mid-frame only holds its own slot.
        let frame = match within(timeout, "request", async { Ok(framed.next().await) }).await? {
            Some(frame) => frame.map_err(|source| Error::Connect { addr, source })?,
            None => return Ok(()),
        };
        let request: Request = wire::decode_frame(&frame)?;
        if peer.encrypted && !peer.authenticated && !matches!(request, Request::Control(_)) {
            // Plaintext sync or RPC on an encrypted node: say why once, then close.
            let refusal = Response::Error(
                "this cluster encrypts its traffic; connect with the cluster key".into(),
            );
            let bytes = wire::encode_frame(&refusal)?;
            let _ = send_frame(&mut framed, bytes, addr, timeout, "response").await;
            return Err(Error::Protocol(
                "plaintext request on an encrypted node".into(),
            ));
        }
        match request {
            Request::Control(ControlRequest::ConfigWatch { prefix }) => {
                return stream_config_watch(framed, peer, shared, prefix, timeout).await;
            }
            Request::Rpc { version } if version == RPC_VERSION => {
                return crate::rpc::serve_connection(framed, shared.rpc.clone())
                    .await
                    .map_err(Error::Protocol);
            }
            _ => {}
        }
        // A join waits up to JOIN_WAIT for the new member by design: its answer is bounded
        // by that on top (with the plain bound, the two raced and the connection closed
        // without the answer saying why the join failed).
        let bound = match &request {
            Request::Control(ControlRequest::Join { .. }) => timeout + super::control::JOIN_WAIT,
            _ => timeout,
        };
        let response = within(bound, "answer", answer(request, peer, shared, transport)).await?;
        let bytes = wire::encode_frame(&response)?;
        Stats::add(
            &shared.stats.tcp_bytes,
            (frame.len() + bytes.len() + 8) as u64,
        );
        send_frame(&mut framed, bytes, addr, timeout, "response").await?;
    }
    Ok(())
}

/// Reads the connection's hello; `false` if the peer closed before sending anything.
///
/// Until the hello is accepted the codec takes no frame above
/// [`wire::frames::UNPROVEN_FRAME`], so a peer that proved nothing gets at most that much
/// buffered. On an encrypted node only a key holder's hello (it arrives sealed) or a
/// loopback one (control) lifts the limit: a plaintext peer elsewhere can do nothing with a
/// big frame but be refused.
async fn hello<S>(
    framed: &mut tokio_util::codec::Framed<S, wire::FrameCodec>,
    peer: Peer,
    shared: &Shared,
    timeout: std::time::Duration,
) -> Result<bool>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let refused = |error: Error| {
        Stats::add(&shared.stats.tcp_refused_hello, 1);
        Err(error)
    };
    let frame = match within(timeout, "hello", async { Ok(framed.next().await) }).await? {
        None => return Ok(false),
        Some(Ok(frame)) => frame,
        Some(Err(source)) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            return refused(Error::Connect {
                addr: peer.addr,
                source,
            })
        }
        Some(Err(source)) => {
            return Err(Error::Connect {
                addr: peer.addr,
                source,
            })
        }
    };
    if let Err(error) = wire::check_hello(&frame) {
        // A grapevine of another protocol version (or one from before hellos) is told why;
        // junk just loses its connection.
        let ours = matches!(error, wire::HelloError::Version(_))
            || wire::decode_frame::<Request>(&frame).is_ok();
        if ours {
            let refusal = Response::Error(format!("refused: {error}; upgrade one side"));
            let bytes = wire::encode_frame(&refusal)?;
            let _ = send_frame(framed, bytes, peer.addr, timeout, "response").await;
        }
        return refused(Error::Protocol(error.to_string()));
    }
    if !peer.encrypted || peer.authenticated || peer.addr.ip().is_loopback() {
        framed.codec_mut().prove();
    }
    Ok(true)
}

/// Streams config changes to a watching client until it disconnects.
async fn stream_config_watch<S>(
    mut framed: tokio_util::codec::Framed<S, wire::FrameCodec>,
    peer: Peer,
    shared: &Shared,
    prefix: String,
    timeout: std::time::Duration,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !control_allowed(shared, peer) {
        let refusal = Response::Control(ControlResponse::Refused(loopback_only(peer)));
        let bytes = wire::encode_frame(&refusal)?;
        let _ = send_frame(&mut framed, bytes, peer.addr, timeout, "response").await;
        return Ok(());
    }
    let mut watch = shared.config().watch_prefix(&prefix);
    loop {
        tokio::select! {
            biased;
            // The client closed (or sent something): the watch is over.
            _ = framed.next() => return Ok(()),
            event = watch.next() => {
                let Some(event) = event else { return Ok(()) };
                let frame = Response::Control(ControlResponse::ConfigEvent(event));
                let bytes = wire::encode_frame(&frame)?;
                // A client that stops reading is dropped rather than buffered for.
                send_frame(&mut framed, bytes, peer.addr, timeout, "watch event").await?;
            }
        }
    }
}

/// Sends one encoded frame to `addr`, within `timeout` (`what` names the wait in errors).
async fn send_frame<S>(
    framed: &mut tokio_util::codec::Framed<S, wire::FrameCodec>,
    bytes: Vec<u8>,
    addr: SocketAddr,
    timeout: std::time::Duration,
    what: &'static str,
) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within(timeout, what, async {
        framed
            .send(bytes::Bytes::from(bytes))
            .await
            .map_err(|source| Error::Connect { addr, source })
    })
    .await
}

/// Control is for loopback, for peers holding the cluster key, and for anyone when the
/// operator allowed remote control on an unencrypted node.
fn control_allowed(shared: &Shared, peer: Peer) -> bool {
    peer.addr.ip().is_loopback()
        || peer.authenticated
        || (shared.allow_remote_control && !peer.encrypted)
}

fn loopback_only(peer: Peer) -> String {
    format!(
        "control requests are accepted from loopback or key holders only; {} is neither",
        peer.addr
    )
}

async fn answer<T: Transport>(
    request: Request,
    peer: Peer,
    shared: &Shared,
    transport: &T,
) -> Result<Response> {
    Ok(match request {
        Request::PushPull(state) => {
            let (reply, answer) = oneshot::channel();
            shared
                .commands
                .send(Command::PushPullIn { state, reply })
                .await
                .map_err(|_| Error::Stopped)?;
            match answer.await {
                Ok(state) => Response::PushPull(state),
                Err(_) => Response::Error("node is stopping".into()),
            }
        }
        Request::PushPullCheck(fingerprint) => {
            let (reply, answer) = oneshot::channel();
            shared
                .commands
                .send(Command::PushPullCheck { fingerprint, reply })
                .await
                .map_err(|_| Error::Stopped)?;
            match answer.await {
                Ok(true) => Response::InSync,
                Ok(false) => Response::OutOfSync,
                Err(_) => Response::Error("node is stopping".into()),
            }
        }
        Request::SyncCheck(fingerprint) => {
            if sync::lock(&shared.state).digest().fingerprint() == fingerprint {
                Response::InSync
            } else {
                Response::OutOfSync
            }
        }
        Request::Sync(digest) => Response::Sync(sync::lock(&shared.state).answer_digest(&digest)),
        Request::SyncPush(push) => {
            let (reply, changed) = {
                let mut state = sync::lock(&shared.state);
                let before = state.version();
                let reply = state.apply_push(push);
                (reply, state.version() != before)
            };
            if changed {
                // The driver publishes on its next turn anyway; this only makes it sooner.
                let _ = shared.commands.try_send(Command::StateChanged);
            }
            Response::SyncPushed(reply)
        }
        Request::Rpc { version } => {
            Response::Error(format!("unsupported RPC protocol version {version}"))
        }
        Request::Control(request) => {
            if control_allowed(shared, peer) {
                Response::Control(control(request, shared, transport).await)
            } else {
                Response::Control(ControlResponse::Refused(loopback_only(peer)))
            }
        }
    })
}

async fn control<T: Transport>(
    request: ControlRequest,
    shared: &Shared,
    transport: &T,
) -> ControlResponse {
    match request {
        ControlRequest::Members => ControlResponse::Members(shared.view.borrow().members.clone()),
        ControlRequest::Info => {
            let view = shared.view.borrow().clone();
            ControlResponse::Info(NodeInfo {
                name: view.identity.name.clone(),
                addr: view.identity.addr,
                generation: view.identity.generation,
                profile: view.profile,
                stats: shared.stats_snapshot(),
                extra: shared.extra_counters(),
            })
        }
        ControlRequest::Services { service } => {
            let catalog = shared.catalog();
            let mut instances = catalog.all_instances();
            if let Some(name) = service {
                instances.retain(|i| i.service == name);
            }
            ControlResponse::Services(instances)
        }
        ControlRequest::ConfigSet { key, value } => match shared.config().set(&key, value).await {
            Ok(change) => ControlResponse::ConfigWritten { seq: change.seq },
            Err(error) => ControlResponse::Refused(error.to_string()),
        },
        ControlRequest::ConfigGet { key } => {
            ControlResponse::ConfigValue(shared.config().get(&key))
        }
        ControlRequest::ConfigDelete { key } => match shared.config().delete(&key).await {
            Ok(existed) => ControlResponse::ConfigDeleted(existed),
            Err(error) => ControlResponse::Refused(error.to_string()),
        },
        ControlRequest::ConfigList { prefix } => {
            ControlResponse::ConfigEntries(shared.config().list(&prefix))
        }
        ControlRequest::ConfigImport { entries } => {
            let invalid = entries.iter().find_map(|(key, value)| {
                crate::state::config::validate_key(key).err().or_else(|| {
                    (value.len() > crate::state::config::MAX_VALUE_LEN).then(|| {
                        crate::state::config::ConfigError::ValueTooLarge {
                            key: key.clone(),
                            len: value.len(),
                        }
                    })
                })
            });
            if let Some(error) = invalid {
                return ControlResponse::Refused(error.to_string());
            }
            let config = shared.config();
            // One wait for the disk at the end (a few group commits), not one per key.
            match config.set_all(entries).await {
                Ok(_) => ControlResponse::ConfigWritten {
                    seq: config.current_seq(),
                },
                Err(error) => ControlResponse::Refused(error.to_string()),
            }
        }
        ControlRequest::Keys { op, cluster } => keys(op, cluster, shared, transport).await,
        ControlRequest::Join { addr } => match shared.join(addr, super::control::JOIN_WAIT).await {
            Ok(()) => ControlResponse::Joined,
            Err(error) => ControlResponse::Refused(format!("failed to join {addr}: {error}")),
        },
        ControlRequest::ForceLeave { node, prune } => {
            match shared.force_leave(&node, prune).await {
                Ok(outcome) => ControlResponse::ForcedLeave(outcome),
                Err(error) => {
                    ControlResponse::Refused(format!("cannot force {node} to leave: {error}"))
                }
            }
        }
        // Handled by the connection loop, which streams.
        ControlRequest::ConfigWatch { .. } => {
            ControlResponse::Refused("a watch needs a connection of its own".into())
        }
    }
}

/// Applies a keyring operation here and, for `cluster`, on every other live member (over
/// the sealed transport, so only key holders take part).
async fn keys<T: Transport>(
    op: KeyOp,
    cluster: bool,
    shared: &Shared,
    transport: &T,
) -> ControlResponse {
    let view = shared.view.borrow().clone();
    let mut report = KeysReport::default();
    match shared.change_keys(&op) {
        Ok(ring) => report.applied.push((
            view.identity.name.clone(),
            ring.keys().iter().map(|k| k.to_base64()).collect(),
        )),
        Err(error) => report
            .failed
            .push((view.identity.name.clone(), error.to_string())),
    }
    if !cluster || !report.failed.is_empty() {
        return ControlResponse::Keys(report);
    }
    let timeout = view.profile.tcp_timeout();
    let others = view
        .members
        .iter()
        .filter(|m| m.status.is_active() && m.name != view.identity.name);
    let requests = others.map(|member| {
        let request = Request::Control(ControlRequest::Keys {
            op: op.clone(),
            cluster: false,
        });
        async move {
            let outcome = exchange(transport, member.addr, &request, timeout).await;
            (member.name.clone(), outcome)
        }
    });
    for (name, outcome) in futures_util::future::join_all(requests).await {
        match outcome {
            Ok((Response::Control(ControlResponse::Keys(mut theirs)), _)) => {
                report.applied.append(&mut theirs.applied);
                report.failed.append(&mut theirs.failed);
            }
            Ok((other, _)) => report
                .failed
                .push((name, format!("unexpected answer {other:?}"))),
            Err(error) => report.failed.push((name, error.to_string())),
        }
    }
    report.applied.sort();
    report.failed.sort();
    ControlResponse::Keys(report)
}
