//! Two RPC services that find and call each other through the catalog, on a local cluster in
//! one process.
//!
//! Both services are typed: declared once as traits with `#[grapevine::service]`, which
//! generates their clients and server registration. Three nodes serve `greeter` (method
//! `greet`: greets a guest and introduces someone), two serve `names` (method `pick`: a name
//! to introduce). A `greeter` handler calls `names.pick` itself, through the catalog, with a
//! client built from its node. A `caller` node calls `greeter.greet` (marked idempotent)
//! from a few concurrent loops and counts which instances answered. Then a greeter crashes
//! (no goodbye): calls go on, retried on the other instances, until the crashed node is
//! marked down and lookups drop it. Finally a `names` node leaves gracefully while the calls
//! keep going.
//!
//! ```text
//! cargo run --release --example greeter
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grapevine::rpc::CallError;
use grapevine::{AppError, Member, MemberStatus, Node, Profile, RpcService};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// How many nodes serve `greeter`, and how many serve `names`.
const GREETERS: usize = 3;
const NAMERS: usize = 2;
/// The names `names.pick` hands out, in turn.
const NAMES: [&str; 6] = ["Ada", "Grace", "Alan", "Barbara", "Edsger", "Leslie"];
/// Concurrent calling loops on the caller, and the pause between two calls of one loop.
const WORKERS: usize = 4;
const PACE: Duration = Duration::from_millis(5);
/// Calls counted while every instance is up, and after each change has settled.
const CALLS_PER_PHASE: usize = 400;
/// Bound of every wait.
const LIMIT: Duration = Duration::from_secs(30);

/// Answer of `names.pick`.
#[derive(Debug, Serialize, Deserialize)]
struct Picked {
    name: String,
    node: String,
}

/// Answer of `greeter.greet`.
#[derive(Debug, Serialize, Deserialize)]
struct Greeting {
    text: String,
    greeter: String,
    picker: String,
}

/// `names`: a name to introduce. Declared once; the macro generates `NamesClient` and
/// `Names::into_service`.
#[grapevine::service(name = "names")]
trait Names {
    /// The next name of [`NAMES`] and the node that picked it. Safe to run twice.
    #[rpc(idempotent)]
    async fn pick(&self) -> Result<Picked, AppError>;
}

/// `greeter` (the trait's name in snake case).
#[grapevine::service]
trait Greeter {
    /// Greets `guest` and introduces someone picked by `names`. Safe to run twice.
    #[rpc(idempotent)]
    async fn greet(&self, guest: String) -> Result<Greeting, AppError>;
}

/// A `names` instance: hands out [`NAMES`] in turn.
struct Namer {
    me: String,
    next: AtomicUsize,
}

impl Names for Namer {
    async fn pick(&self) -> Result<Picked, AppError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(Picked {
            name: NAMES[turn % NAMES.len()].to_string(),
            node: self.me.clone(),
        })
    }
}

fn names_service(node: &Node) -> RpcService {
    Namer {
        me: node.identity().name,
        next: AtomicUsize::new(0),
    }
    .into_service()
}

/// A `greeter` instance: asks `names`, found through its node's catalog, for someone to
/// introduce.
struct Host {
    me: String,
    names: NamesClient,
}

impl Greeter for Host {
    async fn greet(&self, guest: String) -> Result<Greeting, AppError> {
        let me = &self.me;
        let picked = self.names.pick().await.map_err(|error| {
            AppError::new(503, format!("{me} found no name to introduce: {error}"))
        })?;
        Ok(Greeting {
            text: format!(
                "Hello {guest}, {me} here. Meet {} (picked by {})",
                picked.name, picked.node
            ),
            greeter: me.clone(),
            picker: picked.node,
        })
    }
}

fn greeter_service(node: &Node) -> RpcService {
    Host {
        me: node.identity().name,
        names: NamesClient::new(node).with(|c| c.timeout(Duration::from_secs(1))),
    }
    .into_service()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Counts the retries of clients (every node's, as they share this process).
    let retries = tracing_subscriber::filter::Targets::new()
        .with_target("grapevine::rpc::client", tracing::Level::DEBUG);
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(CountRetries.with_filter(retries)),
    )?;

    let started = Instant::now();
    let caller = start("caller", None).await?;
    let seed = caller.addr();
    let mut greeters = Vec::new();
    for i in 1..=GREETERS {
        greeters.push(start(&format!("greeter-{i}"), Some(seed)).await?);
    }
    let mut namers = Vec::new();
    for i in 1..=NAMERS {
        namers.push(start(&format!("names-{i}"), Some(seed)).await?);
    }
    for node in &namers {
        node.serve(names_service(node)).await?;
    }
    for node in &greeters {
        node.serve(greeter_service(node)).await?;
    }
    let size = 1 + GREETERS + NAMERS;
    for node in all(&caller, &greeters, &namers) {
        within(
            format!("{} to see {size} alive members", node.identity().name),
            node.wait_for_members(|m| alive(m) == size),
        )
        .await?;
        wait_for_instances(node, "greeter", GREETERS).await?;
        wait_for_instances(node, "names", NAMERS).await?;
    }
    println!(
        "{size} nodes on 127.0.0.1 (local profile) converged in {:.2} s: every node looks up \
         {GREETERS} \"greeter\" and {NAMERS} \"names\" instances",
        started.elapsed().as_secs_f64()
    );

    // The caller finds `greeter` through its catalog; `greet` is marked idempotent, so a
    // call may be retried elsewhere when an instance fails.
    let client = GreeterClient::new(&caller).with(|c| c.timeout(Duration::from_secs(2)));
    let first = client.greet("caller".to_string()).await?;
    println!("caller -> greeter.greet -> names.pick: \"{}\"", first.text);

    println!(
        "\ncaller calls greeter.greet from {WORKERS} concurrent loops, idempotent, \
         power of two choices"
    );
    let node_names = all(&caller, &greeters, &namers)
        .iter()
        .map(|node| (node.addr().to_string(), node.identity().name))
        .collect();
    let load = Load::start(client, node_names);
    load.wait_for_calls(CALLS_PER_PHASE).await?;

    // The phase ends once the victim is gone: no later call can reach it.
    let victim = greeters.pop().ok_or("no greeter")?;
    let victim_name = victim.identity().name;
    victim.shutdown().await;
    let crashed_at = Instant::now();
    report("before the crash", &load.next_phase());
    println!("\n{victim_name} crashes (no leave); the calls go on");
    within(
        format!("caller to stop trusting {victim_name}"),
        caller.wait_for_members(|m| status(m, &victim_name) != Some(MemberStatus::Alive)),
    )
    .await?;
    let suspected = crashed_at.elapsed();
    for node in all(&caller, &greeters, &namers) {
        within(
            format!("{} to see {victim_name} down", node.identity().name),
            node.wait_for_members(|m| status(m, &victim_name) == Some(MemberStatus::Down)),
        )
        .await?;
    }
    let down = crashed_at.elapsed();
    let tally = load.next_phase();
    println!(
        "caller stops picking {victim_name} after {:.2} s (suspect); every node marks it down \
         after {:.2} s",
        suspected.as_secs_f64(),
        down.as_secs_f64()
    );
    report("crash until down", &tally);
    let found = instance_nodes(&caller, "greeter");
    println!("caller's lookup of \"greeter\": {}", found.join(", "));
    if found.contains(&victim_name) {
        return Err(format!("lookups still return the crashed {victim_name}").into());
    }
    load.wait_for_calls(CALLS_PER_PHASE).await?;
    report(&format!("{victim_name} down"), &load.next_phase());

    let leaver = namers.pop().ok_or("no names node")?;
    let leaver_name = leaver.identity().name;
    println!("\n{leaver_name} leaves gracefully (drains its calls, says goodbye)");
    let left_at = Instant::now();
    within(format!("{leaver_name} to leave"), leaver.leave()).await??;
    for node in all(&caller, &greeters, &namers) {
        within(
            format!("{} to see {leaver_name} left", node.identity().name),
            node.wait_for_members(|m| status(m, &leaver_name) == Some(MemberStatus::Left)),
        )
        .await?;
        wait_for_instances(node, "names", NAMERS - 1).await?;
    }
    println!(
        "every node sees {leaver_name} left, and looks up only {} for \"names\", after {:.2} s",
        instance_nodes(&caller, "names").join(", "),
        left_at.elapsed().as_secs_f64()
    );
    report(&format!("{leaver_name} leaving"), &load.next_phase());
    load.wait_for_calls(CALLS_PER_PHASE).await?;
    let tallies = load.stop().await?;
    report(
        &format!("{leaver_name} gone"),
        tallies.last().ok_or("no tally")?,
    );

    let total: usize = tallies.iter().map(Tally::calls).sum();
    let errors: usize = tallies.iter().map(|t| t.errors).sum();
    println!("\n{total} calls in all, {errors} failed");
    let remaining = all(&caller, &greeters, &namers);
    let leaves = remaining.iter().map(|node| node.leave());
    within(
        "the remaining nodes to leave".to_string(),
        futures_util::future::join_all(leaves),
    )
    .await?
    .into_iter()
    .collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

/// Starts a node on 127.0.0.1 with the local profile.
async fn start(name: &str, seed: Option<std::net::SocketAddr>) -> grapevine::Result<Node> {
    Node::builder(name)
        .seeds(seed)
        .profile(Profile::Local)
        .start()
        .await
}

fn all<'a>(caller: &'a Node, greeters: &'a [Node], namers: &'a [Node]) -> Vec<&'a Node> {
    std::iter::once(caller)
        .chain(greeters)
        .chain(namers)
        .collect()
}

/// Calls answered by each node and failures, in one phase of the demo.
#[derive(Debug, Default, Clone)]
struct Tally {
    greeters: BTreeMap<String, usize>,
    pickers: BTreeMap<String, usize>,
    /// Calls a client moved on from, by the node that failed them.
    retried: BTreeMap<String, usize>,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn calls(&self) -> usize {
        self.greeters.values().sum::<usize>() + self.errors
    }

    fn record(&mut self, result: Result<Greeting, CallError<AppError>>) {
        match result {
            Ok(greeting) => {
                *self.greeters.entry(greeting.greeter).or_default() += 1;
                *self.pickers.entry(greeting.picker).or_default() += 1;
            }
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert(error.to_string());
            }
        }
    }
}

fn report(phase: &str, tally: &Tally) {
    let counts = |map: &BTreeMap<String, usize>| {
        map.iter()
            .map(|(node, n)| format!("{node} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  {phase:<18} {:>5} calls, {} errors | answered by {} | names from {}",
        tally.calls(),
        tally.errors,
        counts(&tally.greeters),
        counts(&tally.pickers)
    );
    if !tally.retried.is_empty() {
        let failed: Vec<String> = tally
            .retried
            .iter()
            .map(|(node, n)| format!("{n} on {node}"))
            .collect();
        println!(
            "  {:<18} retried elsewhere after failing: {}",
            "",
            failed.join(", ")
        );
    }
    if let Some(error) = &tally.first_error {
        println!("  {:<18} first error: {error}", "");
    }
}

/// Loops calling `greeter.greet`, counting each answer in the phase its call started in (and
/// retries in the phase they happen in).
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tallies: Arc<Mutex<Vec<Tally>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// Node names by address.
    node_names: BTreeMap<String, String>,
}

impl Load {
    fn start(client: GreeterClient, node_names: BTreeMap<String, String>) -> Load {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tallies = Arc::new(Mutex::new(vec![Tally::default()]));
        let workers = (0..WORKERS)
            .map(|worker| {
                let (client, phase, stop, tallies) =
                    (client.clone(), phase.clone(), stop.clone(), tallies.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Acquire) {
                        let now = phase.load(Ordering::Acquire);
                        let guest = format!("guest-{worker}.{i}");
                        let result = client.greet(guest).await;
                        i += 1;
                        lock(&tallies)[now].record(result);
                        tokio::time::sleep(PACE).await;
                    }
                })
            })
            .collect();
        lock(&RETRIES).clear();
        Load {
            phase,
            stop,
            tallies,
            workers,
            node_names,
        }
    }

    /// Calls counted so far in the current phase.
    fn calls(&self) -> usize {
        lock(&self.tallies)
            .last()
            .map(Tally::calls)
            .unwrap_or_default()
    }

    async fn wait_for_calls(&self, count: usize) -> Result<(), String> {
        within(format!("{count} calls"), async {
            while self.calls() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Starts a new phase; returns the tally of the one that ended.
    fn next_phase(&self) -> Tally {
        let mut tallies = lock(&self.tallies);
        tallies.push(Tally::default());
        self.phase.store(tallies.len() - 1, Ordering::Release);
        let ended = tallies.len() - 2;
        tallies[ended].retried = self.take_retries();
        tallies[ended].clone()
    }

    /// Retries counted since the last call, by node name.
    fn take_retries(&self) -> BTreeMap<String, usize> {
        std::mem::take(&mut *lock(&RETRIES))
            .into_iter()
            .map(|(addr, n)| (self.node_names.get(&addr).cloned().unwrap_or(addr), n))
            .collect()
    }

    /// Stops the loops once their calls are done; the tallies of every phase.
    async fn stop(mut self) -> Result<Vec<Tally>, String> {
        self.stop.store(true, Ordering::Release);
        for worker in std::mem::take(&mut self.workers) {
            within("a calling loop to stop".to_string(), worker)
                .await?
                .map_err(|e| e.to_string())?;
        }
        let mut tallies = lock(&self.tallies).clone();
        if let Some(last) = tallies.last_mut() {
            last.retried = self.take_retries();
        }
        Ok(tallies)
    }
}

/// Retries by the address of the instance that failed the call.
static RETRIES: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Counts grapevine's "retrying on another instance" events into [`RETRIES`].
struct CountRetries;

impl<S: tracing::Subscriber> Layer<S> for CountRetries {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            addr: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "addr" => self.addr = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message.starts_with("retrying") {
            *lock(&RETRIES).entry(fields.addr).or_default() += 1;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Nodes of the instances `node` looks up for `service`.
fn instance_nodes(node: &Node, service: &str) -> Vec<String> {
    node.catalog()
        .lookup(service)
        .into_iter()
        .map(|i| i.node)
        .collect()
}

/// Waits until `node` looks up exactly `count` instances of `service`.
async fn wait_for_instances(node: &Node, service: &str, count: usize) -> Result<(), String> {
    let mut watch = node.catalog().watch(service);
    let name = node.identity().name;
    let what = format!("{name} to look up {count} {service:?} instances");
    let reached = within(what.clone(), async {
        while let Some(instances) = watch.next().await {
            if instances.len() == count {
                return true;
            }
        }
        false
    })
    .await?;
    reached
        .then_some(())
        .ok_or(format!("{name} stopped while waiting for {what}"))
}

fn alive(members: &[Member]) -> usize {
    members
        .iter()
        .filter(|m| m.status == MemberStatus::Alive)
        .count()
}

fn status(members: &[Member], name: &str) -> Option<MemberStatus> {
    members.iter().find(|m| m.name == name).map(|m| m.status)
}

/// Runs `future` for at most [`LIMIT`]; the error names what was waited for.
async fn within<T>(what: String, future: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(LIMIT, future)
        .await
        .map_err(|_| format!("timed out after {LIMIT:?} waiting for {what}"))
}
