//! `tower` integration: a [`ServiceClient`] is a `tower::Service<RpcRequest>`, so callers
//! stack `tower` layers (timeout, retry, rate and concurrency limits, load shedding) on it,
//! and [`RetryRetryable`] is a ready retry policy that retries only retryable errors.
//! Server-side, [`RpcService::method_service`](super::RpcService::method_service) takes a
//! layered `tower::Service` as a handler.
//!
//! ```no_run
//! # async fn demo(node: grapevine::Node) -> Result<(), tower::BoxError> {
//! use std::time::Duration;
//! use grapevine::{AppError, RetryRetryable, RpcRequest, RpcService};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! // Client: at most 8 calls in flight, the rest shed; retryable failures retried twice.
//! let orders = ServiceBuilder::new()
//!     .load_shed()
//!     .concurrency_limit(8)
//!     .retry(RetryRetryable::new(2, Duration::from_millis(50)))
//!     .service(node.client("orders").idempotent(true));
//! let total: u64 = orders.oneshot(RpcRequest::new("total", &7u64)?).await?.decode()?;
//!
//! // Server: a handler behind a concurrency limit and a timeout.
//! let handler = ServiceBuilder::new()
//!     .load_shed()
//!     .concurrency_limit(64)
//!     .timeout(Duration::from_secs(1))
//!     .service_fn(|id: u64| async move { Ok::<_, AppError>(id * 100) });
//! node.serve(RpcService::new("orders").method_service("total", handler)).await?;
//! # let _ = total;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{protocol, RpcError, ServiceClient};

/// One call through the `tower` interface: a method name and its bincode-encoded request.
/// Cheap to clone (retry layers keep a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRequest {
    /// The method of the service.
    pub method: String,
    /// The encoded request.
    pub payload: Bytes,
}

impl RpcRequest {
    /// A call of `method` with `request`, encoded as the server expects it.
    pub fn new<Req: Serialize + ?Sized>(
        method: impl Into<String>,
        request: &Req,
    ) -> Result<Self, RpcError> {
        Ok(RpcRequest {
            method: method.into(),
            payload: Bytes::from(protocol::to_payload(request)?),
        })
    }
}

/// The answer to an [`RpcRequest`]: the encoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcResponse {
    /// The encoded response.
    pub payload: Bytes,
}

impl RpcResponse {
    /// Decodes the response as `Resp`.
    pub fn decode<Resp: DeserializeOwned>(&self) -> Result<Resp, RpcError> {
        protocol::from_payload(&self.payload)
    }
}

impl tower::Service<RpcRequest> for ServiceClient {
    type Response = RpcResponse;
    type Error = RpcError;
    type Future = Pin<Box<dyn Future<Output = Result<RpcResponse, RpcError>> + Send>>;

    /// Always ready: connections apply their own back-pressure (at most
    /// [`MAX_IN_FLIGHT_PER_CONNECTION`](super::MAX_IN_FLIGHT_PER_CONNECTION) calls in
    /// flight); limits belong to the layers stacked on top.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        let client = self.clone();
        Box::pin(async move {
            let payload = client
                .call_encoded(&request.method, &request.payload)
                .await?;
            Ok(RpcResponse {
                payload: Bytes::from(payload),
            })
        })
    }
}

/// A `tower::retry::Policy` for idempotent calls: retries errors for which
/// [`RpcError::is_retryable`] holds, at most `max_retries` times, waiting `backoff`
/// (doubled each time) before each retry. Application errors, unknown methods and
/// encoding errors are returned at once.
#[derive(Debug, Clone)]
pub struct RetryRetryable {
    retries_left: usize,
    backoff: Duration,
}

impl RetryRetryable {
    /// Retries at most `max_retries` times, the first after `backoff`.
    pub fn new(max_retries: usize, backoff: Duration) -> Self {
        RetryRetryable {
            retries_left: max_retries,
            backoff,
        }
    }
}

impl<Resp> tower::retry::Policy<RpcRequest, Resp, RpcError> for RetryRetryable {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _: &mut RpcRequest,
        result: &mut Result<Resp, RpcError>,
    ) -> Option<Self::Future> {
        match result {
            Err(error) if error.is_retryable() && self.retries_left > 0 => {
                self.retries_left -= 1;
                let wait = self.backoff;
                self.backoff = self.backoff.saturating_mul(2);
                Some(tokio::time::sleep(wait))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &RpcRequest) -> Option<RpcRequest> {
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use futures_util::FutureExt;
    use serde_bytes::ByteBuf;
    use tower::{Service, ServiceBuilder, ServiceExt};

    use super::*;
    use crate::rpc::client::tests::{serve_registry, server, Fixed};
    use crate::rpc::{AppError, Registry, RpcClient, RpcService};

    fn client(addrs: Vec<SocketAddr>) -> ServiceClient {
        RpcClient::new(
            crate::net::TokioTransport,
            crate::node::rpc_preface(),
            Arc::new(Fixed(addrs)),
            1,
        )
        .service("t")
    }

    #[tokio::test]
    async fn a_client_answers_as_a_tower_service() {
        let mut client = client(vec![server().await]);
        let request = RpcRequest::new("echo", &ByteBuf::from(vec![7u8; 100])).unwrap();
        let response = client.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(
            response.decode::<ByteBuf>().unwrap().as_slice(),
            &[7u8; 100]
        );
        let missing = RpcRequest::new("nope", &()).unwrap();
        let error = client
            .ready()
            .await
            .unwrap()
            .call(missing)
            .await
            .unwrap_err();
        assert!(matches!(error, RpcError::NotFound(_)), "{error}");
    }

    #[tokio::test]
    async fn a_rate_limited_client_is_limited() {
        let mut limited = ServiceBuilder::new()
            .rate_limit(2, Duration::from_secs(3600))
            .service(client(vec![server().await]));
        let request = RpcRequest::new("echo", &ByteBuf::from(vec![1u8])).unwrap();
        for _ in 0..2 {
            limited
                .ready()
                .await
                .unwrap()
                .call(request.clone())
                .await
                .unwrap();
        }
        // The third call of the period must wait for the next one.
        assert!(limited.ready().now_or_never().is_none());
    }

    /// A stand-in for a client whose calls fail with `errors` in turn, then succeed.
    fn failing(
        errors: Vec<RpcError>,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<RpcRequest, Response = (), Error = RpcError, Future: Send> + Clone {
        tower::service_fn(move |_: RpcRequest| {
            let turn = calls.fetch_add(1, Ordering::SeqCst);
            let result = errors.get(turn).cloned().map_or(Ok(()), Err);
            std::future::ready(result)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_policy_retries_only_retryable_errors() {
        let request = RpcRequest::new("m", &()).unwrap();
        let unavailable = RpcError::Unavailable {
            reason: "refused".into(),
            retryable: true,
        };
        // Two retryable failures, then success: three calls.
        let calls = Arc::new(AtomicUsize::new(0));
        let retrying = ServiceBuilder::new()
            .retry(RetryRetryable::new(3, Duration::from_millis(10)))
            .service(failing(
                vec![
                    unavailable.clone(),
                    RpcError::Timeout(Duration::from_secs(1)),
                ],
                calls.clone(),
            ));
        retrying.oneshot(request.clone()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // An application error is final: one call.
        let calls = Arc::new(AtomicUsize::new(0));
        let retrying = ServiceBuilder::new()
            .retry(RetryRetryable::new(3, Duration::from_millis(10)))
            .service(failing(
                vec![AppError::new(1, "no").into(), unavailable.clone()],
                calls.clone(),
            ));
        let error = retrying.oneshot(request.clone()).await.unwrap_err();
        assert!(matches!(error, RpcError::Remote(_)), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The retry budget is kept: one retry, then the error.
        let calls = Arc::new(AtomicUsize::new(0));
        let retrying = ServiceBuilder::new()
            .retry(RetryRetryable::new(1, Duration::from_millis(10)))
            .service(failing(vec![unavailable.clone(); 5], calls.clone()));
        assert!(retrying.oneshot(request).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_retry_layer_on_a_real_client_does_not_retry_application_errors() {
        let addr = server().await;
        let retrying = ServiceBuilder::new()
            .retry(RetryRetryable::new(3, Duration::from_millis(1)))
            .service(client(vec![addr]));
        let error = retrying
            .clone()
            .oneshot(RpcRequest::new("nope", &()).unwrap())
            .await
            .unwrap_err();
        assert!(matches!(error, RpcError::NotFound(_)), "{error}");
        // An instance that refuses connections is retried, and fails as unavailable.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let retrying = ServiceBuilder::new()
            .retry(RetryRetryable::new(2, Duration::from_millis(1)))
            .service(client(vec![closed_addr]));
        let error = retrying
            .oneshot(RpcRequest::new("echo", &ByteBuf::new()).unwrap())
            .await
            .unwrap_err();
        assert!(error.is_retryable(), "{error}");
    }

    #[tokio::test]
    async fn server_side_layers_shed_and_time_out_handlers() {
        let (release, released) = tokio::sync::watch::channel(false);
        let entered = Arc::new(AtomicUsize::new(0));
        let slow = tower::service_fn({
            let entered = entered.clone();
            move |(): ()| {
                let mut released = released.clone();
                entered.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = released.wait_for(|&go| go).await;
                    Ok::<_, AppError>(1u32)
                }
            }
        });
        let registry = Arc::new(Registry::default());
        registry.add(
            RpcService::new("t")
                .method_service(
                    "one_at_a_time",
                    ServiceBuilder::new()
                        .load_shed()
                        .concurrency_limit(1)
                        .service(slow.clone()),
                )
                .method_service(
                    "bounded",
                    ServiceBuilder::new()
                        .timeout(Duration::from_millis(50))
                        .service(slow),
                )
                .method_service(
                    "refuses",
                    tower::service_fn(|(): ()| async { Err::<u32, _>(AppError::new(7, "no")) }),
                ),
        );
        let client = client(vec![serve_registry(registry).await]).timeout(Duration::from_secs(20));
        // The first call holds the only slot; the second is shed as retryable unavailable.
        let first = tokio::spawn({
            let client = client.clone();
            async move { client.call::<(), u32>("one_at_a_time", &()).await }
        });
        tokio::time::timeout(Duration::from_secs(20), async {
            while entered.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the first call reached its handler");
        let error = client
            .call::<(), u32>("one_at_a_time", &())
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                RpcError::Unavailable {
                    retryable: true,
                    ..
                }
            ),
            "{error}"
        );
        let error = client.call::<(), u32>("bounded", &()).await.unwrap_err();
        assert!(matches!(error, RpcError::Timeout(_)), "{error}");
        let error = client.call::<(), u32>("refuses", &()).await.unwrap_err();
        assert_eq!(error, RpcError::Remote(AppError::new(7, "no")));
        release.send(true).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(entered.load(Ordering::SeqCst), 2, "the shed call never ran");
    }
}
