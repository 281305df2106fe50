//! grapevine: decentralized service discovery.
//!
//! Nodes keep membership by SWIM gossip over UDP ([foca]), and answer push-pull and control
//! requests over TCP on the same port number. Start one with [`Node::builder`]:
//!
//! ```no_run
//! # async fn demo() -> grapevine::Result<()> {
//! let node = grapevine::Node::builder("node-1")
//!     .bind("127.0.0.1:7946".parse().unwrap())
//!     .seeds(["127.0.0.1:7947".parse().unwrap()])
//!     .start()
//!     .await?;
//! for member in node.members() {
//!     println!("{} {} {}", member.name, member.addr, member.status);
//! }
//! node.leave().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod agent;
pub mod dns;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod membership;
pub mod net;
pub mod node;
pub mod rpc;
pub mod state;
pub mod store;
pub mod sync;
pub mod wire;

pub use error::{Error, Result};
pub use membership::{ForceLeave, Member, MemberEvent, MemberStatus, NodeId, Profile};
pub use node::{
    CatalogHandle, Check, ConfigEvent, ConfigHandle, ConfigWatch, Instance, MemberEvents, Node,
    NodeBuilder, Query, ServiceHandle, ServiceSummary, ServiceWatch, StatsSnapshot,
};
pub use rpc::{
    AppError, LoadBalance, RetryRetryable, RpcError, RpcRequest, RpcResponse, RpcService,
    ServiceClient,
};
pub use state::catalog::{Health, Service};
