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
#[cfg(feature = "opentelemetry")]
pub mod telemetry;
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

/// Declares a typed RPC service as a trait, in the manner of tarpc's `#[tarpc::service]`:
/// generates the client `<Trait>Client` and the server registration `Trait::into_service`,
/// both over the dynamic layer ([`RpcService::method`], [`ServiceClient::call`]). A call to
/// a method that does not exist, or with an argument of the wrong type, does not compile.
///
/// Each method is `async fn name(&self, arg: Type, ...) -> Result<T, E>`: the arguments and
/// `T` are serde types, `E` implements [`rpc::ServiceError`] ([`AppError`] does). The
/// implementation writes `async fn` too; its futures must be `Send`, and the type
/// `Send + Sync + 'static`.
///
/// Generated:
/// - the trait, each method returning `impl Future<Output = Result<T, E>> + Send`, and a
///   provided method `into_service(self) -> RpcService` that registers every method of
///   the implementation under the service name: pass it to [`Node::serve`];
/// - `<Trait>Client` (same visibility): `new(&Node)` finds the service through the node's
///   catalog, `from_client(ServiceClient)` wraps a configured client, `with(|c| ...)`
///   reconfigures it, `SERVICE` is the service name; one `async fn` per trait method with
///   the same arguments, returning `Result<T, rpc::CallError<E>>`.
///
/// Options: `#[grapevine::service(name = "...")]` sets the service name (default: the
/// trait's name in snake case, `NamePicker` -> `name_picker`); on a method,
/// `#[rpc(name = "...")]` sets its name on the wire (default: the method's name) and
/// `#[rpc(idempotent)]` lets the client retry that method on another instance after a
/// connection failure, and hedge it when the client hedges
/// ([`ServiceClient::idempotent`], [`ServiceClient::hedge`]).
///
/// On the wire it is the dynamic layer's format: the request is the tuple of the arguments
/// in bincode, which is the value itself for one argument and nothing for none, so a
/// dynamic caller of a one-argument method sends the plain value. `Ok(T)` is the reply
/// payload; `Err(E)` travels as an [`AppError`] (see [`rpc::typed`]), and the client gives
/// it back as `CallError::App(E)`. Every other failure is `CallError::Rpc`: a server that
/// does not serve the method answers [`RpcError::NotFound`], one whose method takes other
/// types [`RpcError::Protocol`].
///
/// The generated code names this crate as `::grapevine`.
///
/// ```
/// use grapevine::rpc::CallError;
/// use grapevine::{AppError, Node, Profile};
///
/// #[grapevine::service]
/// trait Greeter {
///     /// Greets `name`; refuses an empty one.
///     #[rpc(idempotent)]
///     async fn hello(&self, name: String) -> Result<String, AppError>;
/// }
///
/// struct English;
///
/// impl Greeter for English {
///     async fn hello(&self, name: String) -> Result<String, AppError> {
///         if name.is_empty() {
///             return Err(AppError::new(400, "no name"));
///         }
///         Ok(format!("Hello, {name}!"))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let node = Node::builder("doc").profile(Profile::Local).start().await?;
/// node.serve(English.into_service()).await?;
/// let client = GreeterClient::new(&node);
/// # while node.catalog().lookup(GreeterClient::SERVICE).is_empty() {
/// #     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// # }
/// assert_eq!(client.hello("Ada".into()).await?, "Hello, Ada!");
/// let refused = client.hello(String::new()).await.unwrap_err();
/// assert_eq!(refused, CallError::App(AppError::new(400, "no name")));
/// node.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub use grapevine_macros::service;
