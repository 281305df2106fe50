//! The TCP side of a node: push-pull exchanges and control requests.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;

use super::control::{ControlRequest, ControlResponse, NodeInfo};
use super::driver::Command;
use super::protocol::{Request, Response};
use super::stats::Stats;
use super::Shared;
use crate::error::{Error, Result};
use crate::net::{Listener, Transport};
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
    let frame = match framed.next().await {
        Some(frame) => frame.map_err(|source| Error::Connect { addr: peer, source })?,
        None => return Ok(()),
    };
    let request: Request = wire::decode_frame(&frame)?;
    let response = match request {
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
        Request::Control(request) => Response::Control(control(request, shared)),
    };
    let bytes = wire::encode_frame(&response)?;
    Stats::add(&shared.stats.tcp_bytes, (frame.len() + bytes.len()) as u64);
    framed
        .send(bytes::Bytes::from(bytes))
        .await
        .map_err(|source| Error::Connect { addr: peer, source })?;
    Ok(())
}

fn control(request: ControlRequest, shared: &Shared) -> ControlResponse {
    let view = shared.view.borrow().clone();
    match request {
        ControlRequest::Members => ControlResponse::Members(view.members.clone()),
        ControlRequest::Info => ControlResponse::Info(NodeInfo {
            name: view.identity.name.clone(),
            addr: view.identity.addr,
            generation: view.identity.generation,
            profile: view.profile,
            stats: shared.stats.snapshot(),
        }),
    }
}
