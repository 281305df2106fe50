//! The TCP side of a node: push-pull exchanges and control requests.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

use super::control::{ControlRequest, ControlResponse, NodeInfo};
use super::driver::Command;
use super::protocol::{Request, Response, MAX_REQUESTS_PER_CONNECTION};
use super::stats::Stats;
use super::Shared;
use crate::error::{Error, Result};
use crate::net::{Listener, Transport};
use crate::sync;
use crate::wire;

/// Most TCP connections served at once; more are closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 256;

pub(crate) async fn serve<T: Transport>(listener: T::Listener, shared: Arc<Shared>) {
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
                connections.spawn(async move {
                    let timeout = shared.view.borrow().profile.tcp_timeout();
                    match tokio::time::timeout(timeout, handle(stream, peer, &shared)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            Stats::add(&shared.stats.tcp_dropped, 1);
                            tracing::debug!(%peer, %error, "tcp request dropped");
                        }
                        Err(_) => {
                            Stats::add(&shared.stats.tcp_dropped, 1);
                            tracing::debug!(%peer, "tcp request timed out");
                        }
                    }
                    drop(permit);
                });
            }
        }
    }
}

async fn handle<S>(stream: S, peer: SocketAddr, shared: &Shared) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut framed = wire::framed(stream);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let frame = match framed.next().await {
            Some(frame) => frame.map_err(|source| Error::Connect { addr: peer, source })?,
            None => return Ok(()),
        };
        let request: Request = wire::decode_frame(&frame)?;
        let response = answer(request, peer, shared).await?;
        let bytes = wire::encode_frame(&response)?;
        Stats::add(
            &shared.stats.tcp_bytes,
            (frame.len() + bytes.len() + 8) as u64,
        );
        framed
            .send(bytes::Bytes::from(bytes))
            .await
            .map_err(|source| Error::Connect { addr: peer, source })?;
    }
    Ok(())
}

async fn answer(request: Request, peer: SocketAddr, shared: &Shared) -> Result<Response> {
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
        Request::Control(request) => {
            if !shared.allow_remote_control && !peer.ip().is_loopback() {
                Response::Error(format!(
                    "control requests are accepted from loopback only; {peer} is not"
                ))
            } else {
                Response::Control(control(request, shared))
            }
        }
    })
}

fn control(request: ControlRequest, shared: &Shared) -> ControlResponse {
    match request {
        ControlRequest::Members => ControlResponse::Members(shared.view.borrow().members.clone()),
        ControlRequest::Info => {
            let view = shared.view.borrow().clone();
            ControlResponse::Info(NodeInfo {
                name: view.identity.name.clone(),
                addr: view.identity.addr,
                generation: view.identity.generation,
                profile: view.profile,
                stats: shared.stats.snapshot(),
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
    }
}
