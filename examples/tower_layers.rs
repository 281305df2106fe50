//! `tower` layers stacked on a grapevine RPC client, on a two-node cluster in one process.
//!
//! Node `shop` serves `orders.get`; node `front` calls it through a stack of `tower` layers:
//! an overall timeout, a retry with grapevine's [`RetryRetryable`] policy (only
//! unavailable and timed-out calls are retried, and the client is marked idempotent), a
//! concurrency limit and a load shedder in front of it. The example fires a burst of
//! concurrent calls and prints how many went through and how many were shed, then calls an
//! unknown order (an application error: not retried) and stops.
//!
//! ```text
//! cargo run --example tower_layers
//! ```

use std::time::Duration;

use grapevine::{AppError, Node, Profile, RetryRetryable, RpcRequest, RpcService};
use serde::{Deserialize, Serialize};
use tower::{Service, ServiceBuilder, ServiceExt};

/// Bound of every wait.
const LIMIT: Duration = Duration::from_secs(30);
/// Concurrent calls of the burst, and how many the concurrency limit lets through at once.
const BURST: usize = 64;
const CONCURRENCY: usize = 8;

#[derive(Serialize, Deserialize)]
struct GetOrder {
    id: u64,
}

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tokio::time::timeout(LIMIT, run()).await??;
    Ok(())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let shop = Node::builder("shop")
        .profile(Profile::Local)
        .start()
        .await?;
    let front = Node::builder("front")
        .seeds(Some(shop.addr()))
        .profile(Profile::Local)
        .start()
        .await?;
    shop.serve(
        RpcService::new("orders").method("get", |req: GetOrder| async move {
            if req.id == 0 {
                return Err(AppError::new(404, "no such order"));
            }
            // Some work, so that calls overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Order {
                id: req.id,
                total_cents: 100 * req.id,
            })
        }),
    )
    .await?;
    while front.catalog().lookup("orders").is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Each attempt has the client's deadline; the `tower` timeout bounds all attempts.
    let client = front
        .client("orders")
        .idempotent(true)
        .timeout(Duration::from_secs(1));
    let stack = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(CONCURRENCY)
        .timeout(Duration::from_secs(5))
        .retry(RetryRetryable::new(2, Duration::from_millis(50)))
        .service(client);

    // A burst: calls beyond the concurrency limit are shed at once instead of queueing.
    let calls = (1..=BURST as u64).map(|id| {
        let mut stack = stack.clone();
        async move {
            let request = RpcRequest::new("get", &GetOrder { id })?;
            let response = stack.ready().await?.call(request).await?;
            let order: Order = response.decode()?;
            Ok::<_, tower::BoxError>(order.total_cents == 100 * order.id)
        }
    });
    let (mut answered, mut shed) = (0, 0);
    for result in futures_util::future::join_all(calls).await {
        match result {
            Ok(correct) => {
                assert!(correct, "a wrong answer");
                answered += 1;
            }
            Err(error) if error.is::<tower::load_shed::error::Overloaded>() => shed += 1,
            Err(error) => return Err(error),
        }
    }
    println!("burst of {BURST}: {answered} answered, {shed} shed (limit {CONCURRENCY})");

    // An application error is final: the retry layer does not repeat it.
    let request = RpcRequest::new("get", &GetOrder { id: 0 })?;
    let error = stack.clone().oneshot(request).await.unwrap_err();
    println!("unknown order: {error}");

    front.shutdown().await;
    shop.shutdown().await;
    Ok(())
}
