//! The `grapevine` binary: the agent daemon and the commands that talk to it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use grapevine::agent::settings::{AgentSettings, CheckChoice};
use grapevine::node::{control, SeedName};
use std::time::Duration;

use grapevine::{ForceLeave, Instance, Member, Node, Profile, Service};

#[derive(Parser)]
#[command(
    name = "grapevine",
    version,
    about = "Decentralized service discovery agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent until interrupted (SIGINT/SIGTERM), then leave the cluster gracefully.
    Agent(Box<AgentArgs>),
    /// List the members a running agent sees.
    Members {
        /// The agent to ask (its gossip/TCP address).
        #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the service instances a running agent knows (all, or those of one service).
    Services {
        /// Only this service.
        service: Option<String>,
        /// The agent to ask.
        #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read and write the cluster-wide configuration store through a running agent.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
        /// The agent to talk to.
        #[arg(long, global = true, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
    },
    /// Measure round trips to a node with its built-in `grapevine.ping` RPC method.
    Ping {
        /// The node's address (its gossip/TCP port).
        #[arg(value_name = "NODE_ADDR", value_parser = parse_addr)]
        node: SocketAddr,
        /// How many pings.
        #[arg(long, short = 'c', default_value_t = 5)]
        count: u32,
        /// Pause between pings, in milliseconds.
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
    /// Print a new random encryption key (base64) for --encrypt or a keyring file.
    Keygen,
    /// List or rotate the encryption keys of the whole cluster through a running agent:
    /// install the new key everywhere, then use it, then remove the old one.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        /// The agent to talk to.
        #[arg(long, global = true, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
    },
    /// Make a running agent join a cluster through other nodes (as `consul join`).
    Join {
        /// Nodes to join through (IP:PORT or HOST:PORT); the agent waits up to 5 s for each.
        #[arg(required = true, value_name = "HOST:PORT", value_parser = parse_addr)]
        addrs: Vec<SocketAddr>,
        /// The agent to ask.
        #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
    },
    /// Force a failed member into the `left` state through a running agent (as
    /// `consul force-leave`): its instances leave lookups on every live node. A live member
    /// is left as it is.
    ForceLeave {
        /// The member's node name.
        node: String,
        /// Also remove it from the agent's member list at once (this agent only).
        #[arg(long)]
        prune: bool,
        /// The agent to ask.
        #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
    },
    /// Show a running agent's identity and traffic counters.
    Info {
        /// The agent to ask.
        #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, default_value = "127.0.0.1:7946")]
        agent: SocketAddr,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// The keys of every live member, and how many members hold each.
    List,
    /// Add KEY to every member's keyring (used for receiving only).
    Install {
        /// A base64 key from `grapevine keygen`.
        key: String,
    },
    /// Make KEY (installed everywhere) the key every member seals with.
    Use {
        /// The key.
        key: String,
    },
    /// Remove KEY from every member (refused for a primary key).
    Remove {
        /// The key.
        key: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Write KEY (ENV/PATH/NAME) = VALUE on every node.
    Set {
        /// The key, environment first: prod/orders/max_conn.
        key: String,
        /// The value (stored as given).
        value: String,
    },
    /// Print the value of KEY; exit 1 if it is not set.
    Get {
        /// The key.
        key: String,
    },
    /// Delete KEY on every node.
    Del {
        /// The key.
        key: String,
    },
    /// List keys and values under PREFIX (whole path segments; all keys by default).
    List {
        /// Path prefix, e.g. prod/orders.
        #[arg(default_value = "")]
        prefix: String,
        /// Print a JSON object key → value instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Print one line per change under PREFIX until interrupted.
    Watch {
        /// Path prefix, e.g. prod.
        prefix: String,
    },
    /// Import a TOML file: tables become path segments (see the README).
    Import {
        /// The file.
        file: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// An agent configuration file holding any of these flags (see the README); flags given
    /// here override it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<std::path::PathBuf>,
    /// Unique node name (required, here or in --config).
    #[arg(long)]
    name: Option<String>,
    /// Address to bind UDP gossip and TCP on (one port number for both) [default:
    /// 127.0.0.1:7946].
    #[arg(long, value_name = "IP:PORT", value_parser = parse_addr)]
    bind: Option<SocketAddr>,
    /// Address other nodes reach this one at (default: the bind address; when binding an
    /// unspecified IP such as 0.0.0.0, this host's address on the route to the first seed, or
    /// to the default route).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_addr)]
    advertise: Option<SocketAddr>,
    /// A node to join through, IP:PORT or HOST:PORT; repeatable. Retried until one answers.
    /// Host names are resolved again on every retry while the agent has no peer, and every
    /// address a name resolves to is a seed (a Docker network alias, a Kubernetes headless
    /// Service).
    #[arg(long = "join", value_name = "HOST:PORT", value_parser = parse_seed)]
    join: Vec<Seed>,
    /// Timing profile: lan, wan or local [default: lan].
    #[arg(long)]
    profile: Option<Profile>,
    /// A service instance to register at start, NAME:PORT[:TAG,TAG...]; repeatable. Its
    /// health is a TCP connect check against the port unless --no-check.
    #[arg(long = "service", value_name = "NAME:PORT[:TAGS]", value_parser = parse_service)]
    services: Vec<Service>,
    /// Register --service instances without a health check (always passing).
    #[arg(long)]
    no_check: bool,
    /// Accept control commands (members, services, ...) from other hosts, not only loopback.
    #[arg(long)]
    allow_remote_control: bool,
    /// A TOML file whose keys are written to the config store at start (see the README for
    /// the precedence rules).
    #[arg(long, value_name = "FILE.toml")]
    config_file: Option<std::path::PathBuf>,
    /// Encrypt all traffic with this base64 key (from `grapevine keygen`).
    #[arg(long, value_name = "KEY", conflicts_with = "keyring")]
    encrypt: Option<String>,
    /// Encrypt with the keys of this JSON file (an array of base64 keys, primary first);
    /// rotations are saved back to it.
    #[arg(long, value_name = "FILE")]
    keyring: Option<std::path::PathBuf>,
    /// Label bound into every sealed message (clusters with different labels never mix) and
    /// recorded in the data dir [default: grapevine].
    #[arg(long)]
    cluster_label: Option<String>,
    /// Keep the config store, this agent's run-time service registrations, its identity, the
    /// members to rejoin through and the keyring in this directory, so that a restart (even
    /// of the whole cluster) loses nothing. Without it, everything is in memory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Serve the Consul-compatible HTTP API, /metrics and the status page on this address
    /// (default 127.0.0.1:8500 when given bare). A non-loopback address needs a token.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, num_args = 0..=1,
          default_missing_value = "127.0.0.1:8500")]
    http: Option<SocketAddr>,
    /// Require this token on every HTTP request (X-Consul-Token, Authorization: Bearer, or
    /// ?token=); others get 403.
    #[arg(long, value_name = "TOKEN", conflicts_with = "http_token_file")]
    http_token: Option<String>,
    /// Read the HTTP token from this file (first line), keeping it out of `ps`.
    #[arg(long, value_name = "FILE")]
    http_token_file: Option<std::path::PathBuf>,
    /// Longest wait of an HTTP blocking query, e.g. 30s [default: 10m, as Consul's].
    #[arg(long, value_name = "DURATION", value_parser = parse_wait)]
    http_max_wait: Option<Duration>,
    /// Bytes of HTTP request bodies that may be arriving at once, over all connections,
    /// e.g. 4MiB; a request finding it spent gets 503 [default: 4MiB; at least 128KiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_body_budget)]
    http_body_budget: Option<usize>,
    /// Answer DNS queries for the catalog on this address, UDP and TCP (default
    /// 127.0.0.1:8600 when given bare): `dig @127.0.0.1 -p 8600 web.service.consul SRV`.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_addr, num_args = 0..=1,
          default_missing_value = grapevine::dns::DEFAULT_ADDR)]
    dns: Option<SocketAddr>,
    /// The domain the DNS interface answers for; every other name is refused.
    /// [default: consul.]
    #[arg(long, value_name = "DOMAIN")]
    dns_domain: Option<String>,
    /// TTL of DNS answers (seconds, or with a unit: 30s, 5m, 1h); 0 means never cached
    /// [default: 0].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    dns_ttl: Option<Duration>,
    /// TTL of one service's DNS answers, NAME=DURATION; NAME may end in `*` (a prefix).
    /// Repeatable.
    #[arg(long = "dns-service-ttl", value_name = "NAME=DURATION", value_parser = parse_service_ttl)]
    dns_service_ttl: Vec<(String, Duration)>,
    /// Export the agent's RPC spans to this OpenTelemetry collector's OTLP/HTTP receiver,
    /// e.g. http://127.0.0.1:4318 (`/v1/traces` is appended to a URL without a path). Needs a
    /// binary built with `--features opentelemetry`.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// `30`, `30s`, `5m`, `1h` (Consul's durations; a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    grapevine::http::parse_duration(text).map_err(|error| format!("{text:?}: {error}"))
}

fn parse_service_ttl(text: &str) -> Result<(String, Duration), String> {
    let (name, ttl) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=DURATION"))?;
    if name.is_empty() {
        return Err(format!("{text:?} names no service"));
    }
    Ok((name.to_string(), parse_duration(ttl)?))
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    let wait = parse_duration(text)?;
    if wait > Duration::from_secs(3600) {
        return Err(format!("{text:?} must be at most 1 hour"));
    }
    Ok(wait)
}

/// A size in bytes: a number, optionally followed by `KiB` or `MiB`.
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        other => return Err(format!("{text:?}: unknown unit {other:?} (B, KiB or MiB)")),
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a size such as 4MiB"))
}

fn parse_body_budget(text: &str) -> Result<usize, String> {
    let budget = parse_size(text)?;
    // Below the largest body, a body of that size could never be admitted.
    let least = grapevine::http::HttpOptions::default().max_body;
    if budget < least {
        return Err(format!(
            "{text:?} must be at least {} KiB (the largest request body)",
            least / 1024
        ));
    }
    Ok(budget)
}

fn parse_service(text: &str) -> Result<Service, String> {
    let mut parts = text.splitn(3, ':');
    let name = parts.next().unwrap_or_default();
    let port: u16 = parts
        .next()
        .ok_or_else(|| format!("{text:?} is not NAME:PORT[:TAG,TAG...]"))?
        .parse()
        .map_err(|_| format!("{text:?} has no valid port (1-65535)"))?;
    if port == 0 {
        return Err(format!("{text:?} has no valid port (1-65535)"));
    }
    let mut service = Service::new(name, format!("{name}-{port}"), port);
    if let Some(tags) = parts.next() {
        service.tags = tags
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
    }
    service.validate().map_err(|error| error.to_string())?;
    Ok(service)
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    // Names are checked first, so that a typo is not reported as a resolver failure.
    text.parse::<SeedName>()
        .map_err(|error| format!("{text:?} is not IP:PORT or HOST:PORT: {}", error.reason))?;
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{text:?} resolves to no address")),
        Err(error) => Err(format!("cannot resolve {text:?}: {error}")),
    }
}

/// A `--join` seed: an address, or a host name resolved while the agent is alone.
#[derive(Clone)]
enum Seed {
    Addr(SocketAddr),
    Name(SeedName),
}

fn parse_seed(text: &str) -> Result<Seed, String> {
    if let Ok(addr) = text.parse() {
        return Ok(Seed::Addr(addr));
    }
    text.parse()
        .map(Seed::Name)
        .map_err(|error: grapevine::node::InvalidSeed| error.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                error.exit();
            }
            // One line naming the problem; the full usage is one `--help` away.
            let rendered = error.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{first} (try 'grapevine --help')");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> grapevine::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => agent(*args).await,
        Command::Members { agent, json } => {
            let members = control::members(agent).await?;
            if json {
                println!("{}", to_json(&members));
            } else {
                print_members(&members);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Services {
            service,
            agent,
            json,
        } => {
            let instances = control::services(agent, service).await?;
            if json {
                let rows: Vec<_> = instances
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "service": i.service,
                            "id": i.id,
                            "node": i.node,
                            "addr": i.addr,
                            "port": i.port,
                            "tags": i.tags,
                            "meta": i.meta,
                            "health": i.health,
                            "node_status": i.node_status,
                        })
                    })
                    .collect();
                println!("{}", to_json(&rows));
            } else {
                print_services(&instances);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { command, agent } => config_command(command, agent).await,
        Command::Keygen => {
            let key = grapevine::net::sealed::Key::generate()
                .map_err(|error| grapevine::Error::Config(error.to_string()))?;
            println!("{}", key.to_base64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command, agent } => keys_command(command, agent).await,
        Command::Ping {
            node,
            count,
            interval_ms,
        } => ping(node, count, Duration::from_millis(interval_ms)).await,
        Command::Join { addrs, agent } => {
            let mut joined = 0;
            for addr in &addrs {
                match control::join(agent, *addr).await {
                    Ok(()) => joined += 1,
                    Err(error) => eprintln!("error: {error}"),
                }
            }
            if joined == 0 {
                eprintln!(
                    "error: could not join through any of {} node(s)",
                    addrs.len()
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("Successfully joined cluster by contacting {joined} nodes.");
            Ok(ExitCode::SUCCESS)
        }
        Command::ForceLeave { node, prune, agent } => {
            match control::force_leave(agent, &node, prune).await? {
                ForceLeave::NotFound => {
                    eprintln!("error: agent: No node found with name '{node}'");
                    return Ok(ExitCode::FAILURE);
                }
                ForceLeave::Alive => {
                    println!("{node} is alive and reachable: it stays a member");
                }
                ForceLeave::Left => println!("{node} is now left"),
                ForceLeave::Pruned => println!("{node} is left and pruned from the member list"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Info { agent, json } => {
            let info = control::info(agent).await?;
            if json {
                println!("{}", to_json(&info));
            } else {
                println!("name:       {}", info.name);
                println!("addr:       {}", info.addr);
                println!("generation: {}", info.generation);
                println!("profile:    {:?}", info.profile);
                for (key, value) in info.stats.named() {
                    println!("{key:<20} {value}");
                }
                // Counters of components layered on the node (the DNS interface).
                for (key, value) in &info.extra {
                    println!("{key:<20} {value}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value)
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"))
}

fn print_members(members: &[Member]) {
    let width = members
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<21}  {:<7}  GENERATION",
        "NAME", "ADDR", "STATUS"
    );
    for member in members {
        println!(
            "{:<width$}  {:<21}  {:<7}  {}",
            member.name,
            member.addr.to_string(),
            member.status.to_string(),
            member.generation
        );
    }
}

fn print_services(instances: &[Instance]) {
    println!(
        "{:<16}  {:<20}  {:<12}  {:<21}  {:<8}  {:<7}  TAGS",
        "SERVICE", "ID", "NODE", "ADDR", "HEALTH", "NODE"
    );
    for i in instances {
        println!(
            "{:<16}  {:<20}  {:<12}  {:<21}  {:<8}  {:<7}  {}",
            i.service,
            i.id,
            i.node,
            i.socket_addr().to_string(),
            i.health.to_string(),
            i.node_status.to_string(),
            i.tags.join(",")
        );
    }
}

async fn ping(node: SocketAddr, count: u32, interval: Duration) -> grapevine::Result<ExitCode> {
    use grapevine::node::rpc::Pong;
    use grapevine::rpc::{Resolve, RpcClient};
    // A bare client: no node of our own, nothing to resolve.
    struct Nowhere;
    impl Resolve for Nowhere {
        fn resolve(&self, _: &str) -> Vec<grapevine::rpc::Endpoint> {
            Vec::new()
        }
    }
    let client = RpcClient::new(
        grapevine::net::TokioTransport,
        grapevine::node::rpc_preface(),
        std::sync::Arc::new(Nowhere),
        0,
    );
    let mut times = Vec::new();
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let started = std::time::Instant::now();
        let pong: Pong = client
            .call_addr(
                node,
                grapevine::rpc::BUILTIN_SERVICE,
                "ping",
                &(),
                Duration::from_secs(5),
            )
            .await?;
        let rtt = started.elapsed();
        times.push(rtt);
        println!(
            "reply from {} ({node}): seq={i} time={:.3} ms",
            pong.node,
            rtt.as_secs_f64() * 1e3
        );
    }
    if !times.is_empty() {
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{} pings: min {:.3} ms, median {:.3} ms, max {:.3} ms",
            times.len(),
            ms(times[0]),
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1])
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn keys_command(command: KeysCommand, agent: SocketAddr) -> grapevine::Result<ExitCode> {
    use control::{expect, ControlRequest as Req, ControlResponse as Resp, KeyOp};
    let (op, verb) = match command {
        KeysCommand::List => (KeyOp::List, "listed"),
        KeysCommand::Install { key } => (KeyOp::Install(key), "installed"),
        KeysCommand::Use { key } => (KeyOp::Use(key), "now used"),
        KeysCommand::Remove { key } => (KeyOp::Remove(key), "removed"),
    };
    let listing = op == KeyOp::List;
    let report = expect(agent, Req::Keys { op, cluster: true }, |r| match r {
        Resp::Keys(report) => Some(report),
        _ => None,
    })
    .await?;
    let total = report.applied.len() + report.failed.len();
    if listing {
        let mut holders: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (_, keys) in &report.applied {
            for (i, key) in keys.iter().enumerate() {
                let entry = holders.entry(key).or_default();
                entry.0 += 1;
                if i == 0 {
                    entry.1 += 1;
                }
            }
        }
        for (key, (held, primary)) in holders {
            println!("{key}  held by {held}/{total} nodes, primary on {primary}");
        }
    } else {
        println!("key {verb} on {}/{total} nodes", report.applied.len());
    }
    for (node, reason) in &report.failed {
        eprintln!("error: {node}: {reason}");
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn shown(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

async fn config_command(command: ConfigCommand, agent: SocketAddr) -> grapevine::Result<ExitCode> {
    use control::{expect, ControlRequest as Req, ControlResponse as Resp};
    match command {
        ConfigCommand::Set { key, value } => {
            let value = value.into_bytes();
            expect(agent, Req::ConfigSet { key, value }, |r| match r {
                Resp::ConfigWritten { seq } => Some(seq),
                _ => None,
            })
            .await?;
        }
        ConfigCommand::Get { key } => {
            let request = Req::ConfigGet { key: key.clone() };
            let value = expect(agent, request, |r| match r {
                Resp::ConfigValue(value) => Some(value),
                _ => None,
            })
            .await?;
            match value {
                Some(value) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&value);
                    let _ = out.write_all(b"\n");
                }
                None => {
                    eprintln!("error: key {key:?} is not set");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        ConfigCommand::Del { key } => {
            let request = Req::ConfigDelete { key: key.clone() };
            let existed = expect(agent, request, |r| match r {
                Resp::ConfigDeleted(existed) => Some(existed),
                _ => None,
            })
            .await?;
            if !existed {
                eprintln!("note: key {key:?} was not set");
            }
        }
        ConfigCommand::List { prefix, json } => {
            let entries = expect(agent, Req::ConfigList { prefix }, |r| match r {
                Resp::ConfigEntries(entries) => Some(entries),
                _ => None,
            })
            .await?;
            if json {
                let object: serde_json::Map<String, serde_json::Value> = entries
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(shown(v))))
                    .collect();
                println!("{}", to_json(&object));
            } else {
                for (key, value) in entries {
                    println!("{key} = {}", shown(&value));
                }
            }
        }
        ConfigCommand::Watch { prefix } => {
            use std::io::Write;
            control::watch_config(agent, prefix, |event| {
                let mut out = std::io::stdout().lock();
                let written = match event {
                    grapevine::ConfigEvent::Changed(change) => match change.value {
                        Some(value) => {
                            writeln!(out, "{} set {} = {}", change.seq, change.key, shown(&value))
                        }
                        None => writeln!(out, "{} del {}", change.seq, change.key),
                    },
                    grapevine::ConfigEvent::Snapshot { seq, entries } => {
                        let mut result = writeln!(out, "{seq} snapshot of {} keys", entries.len());
                        for (key, value) in entries {
                            result =
                                result.and(writeln!(out, "{seq} set {key} = {}", shown(&value)));
                        }
                        result
                    }
                };
                // Stop when stdout is gone (e.g. piped into `head`).
                written.and(out.flush()).is_ok()
            })
            .await?;
        }
        ConfigCommand::Import { file } => {
            let entries = grapevine::agent::config_file::load(&file)
                .map_err(|error| grapevine::Error::Config(error.to_string()))?;
            let count = entries.len();
            expect(agent, Req::ConfigImport { entries }, |r| match r {
                Resp::ConfigWritten { seq } => Some(seq),
                _ => None,
            })
            .await?;
            println!("imported {count} keys from {}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's settings once the flags and the `--config` file are merged.
struct AgentSetup {
    name: String,
    bind: SocketAddr,
    advertise: Option<SocketAddr>,
    join: Vec<Seed>,
    profile: Profile,
    /// Services to declare, with the check each asks for.
    services: Vec<(Service, CheckChoice)>,
    no_check: bool,
    allow_remote_control: bool,
    config_file: Option<std::path::PathBuf>,
    encrypt: Option<String>,
    keyring: Option<std::path::PathBuf>,
    cluster_label: String,
    http: Option<SocketAddr>,
    data_dir: Option<std::path::PathBuf>,
    dns: Option<SocketAddr>,
    dns_domain: String,
    dns_ttl: Duration,
    dns_service_ttl: Vec<(String, Duration)>,
    http_token: Option<String>,
    http_token_file: Option<std::path::PathBuf>,
    http_max_wait: Duration,
    http_body_budget: usize,
    otlp_endpoint: Option<String>,
}

/// Merges the flags over the `--config` file: a flag given wins; lists given on the command
/// line replace the file's.
fn agent_setup(args: AgentArgs) -> grapevine::Result<AgentSetup> {
    let file = match &args.config {
        Some(path) => AgentSettings::load(path)
            .map_err(|error| grapevine::Error::Config(format!("--config {error}")))?,
        None => AgentSettings::default(),
    };
    let path = args.config.clone().unwrap_or_default();
    let field = |name: &str, message: String| {
        grapevine::Error::Config(format!("--config {}: {name}: {message}", path.display()))
    };
    let name = args.name.or(file.name).ok_or_else(|| {
        grapevine::Error::Config("give the node a name: --name NAME (or name in --config)".into())
    })?;
    let bind = match (args.bind, &file.bind) {
        (Some(bind), _) => bind,
        (None, Some(text)) => parse_addr(text).map_err(|e| field("bind", e))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 7946)),
    };
    let advertise = match (args.advertise, &file.advertise) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => Some(parse_addr(text).map_err(|e| field("advertise", e))?),
        (None, None) => None,
    };
    let join = if args.join.is_empty() {
        file.join
            .iter()
            .map(|text| parse_seed(text).map_err(|e| field("join", e)))
            .collect::<grapevine::Result<_>>()?
    } else {
        args.join
    };
    let profile = match (args.profile, &file.profile) {
        (Some(profile), _) => profile,
        (None, Some(text)) => text.parse().map_err(|e| field("profile", e))?,
        (None, None) => Profile::Lan,
    };
    let services = if args.services.is_empty() {
        file.services
            .iter()
            .map(|s| {
                // Checked when the file was read.
                let service = s.to_service().map_err(|e| field("service", e))?;
                let check = s.check_choice().map_err(|e| field("service.check", e))?;
                Ok((service, check))
            })
            .collect::<grapevine::Result<_>>()?
    } else {
        args.services
            .into_iter()
            .map(|service| (service, CheckChoice::Default))
            .collect()
    };
    let http = match (args.http, &file.http) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => Some(parse_addr(text).map_err(|e| field("http", e))?),
        (None, None) => None,
    };
    let dns = match (args.dns, &file.dns) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => Some(parse_addr(text).map_err(|e| field("dns", e))?),
        (None, None) => None,
    };
    let dns_ttl = match (args.dns_ttl, &file.dns_ttl) {
        (Some(ttl), _) => ttl,
        (None, Some(text)) => parse_duration(text).map_err(|e| field("dns_ttl", e))?,
        (None, None) => Duration::ZERO,
    };
    let dns_service_ttl = if args.dns_service_ttl.is_empty() {
        file.dns_service_ttl
            .iter()
            .map(|text| parse_service_ttl(text).map_err(|e| field("dns_service_ttl", e)))
            .collect::<grapevine::Result<_>>()?
    } else {
        args.dns_service_ttl
    };
    let http_max_wait = match (args.http_max_wait, &file.http_max_wait) {
        (Some(wait), _) => wait,
        (None, Some(text)) => parse_wait(text).map_err(|e| field("http_max_wait", e))?,
        (None, None) => Duration::from_secs(600),
    };
    let http_body_budget = match (args.http_body_budget, &file.http_body_budget) {
        (Some(budget), _) => budget,
        (None, Some(text)) => parse_body_budget(text).map_err(|e| field("http_body_budget", e))?,
        (None, None) => grapevine::http::HttpOptions::default().max_bodies_in_flight,
    };
    let (encrypt, keyring) = match (args.encrypt, args.keyring) {
        (None, None) => (file.encrypt, file.keyring),
        given => given,
    };
    if encrypt.is_some() && keyring.is_some() {
        return Err(grapevine::Error::Config(
            "give either encrypt or keyring, not both".into(),
        ));
    }
    Ok(AgentSetup {
        name,
        bind,
        advertise,
        join,
        profile,
        services,
        no_check: args.no_check || file.no_check.unwrap_or(false),
        allow_remote_control: args.allow_remote_control
            || file.allow_remote_control.unwrap_or(false),
        config_file: args.config_file.or(file.config_file),
        encrypt,
        keyring,
        cluster_label: args
            .cluster_label
            .or(file.cluster_label)
            .unwrap_or_else(|| grapevine::node::DEFAULT_CLUSTER_LABEL.to_string()),
        http,
        data_dir: args.data_dir.or(file.data_dir),
        dns,
        dns_domain: args
            .dns_domain
            .or(file.dns_domain)
            .unwrap_or_else(|| grapevine::dns::DEFAULT_DOMAIN.to_string()),
        dns_ttl,
        dns_service_ttl,
        http_token: args.http_token.or(file.http_token),
        http_token_file: args.http_token_file.or(file.http_token_file),
        http_max_wait,
        http_body_budget,
        otlp_endpoint: args.otlp_endpoint.or(file.otlp_endpoint),
    })
}

async fn agent(args: AgentArgs) -> grapevine::Result<ExitCode> {
    let args = agent_setup(args)?;
    // Held to the end: dropping it sends the spans still queued.
    let _telemetry = init_logging(args.otlp_endpoint.as_deref(), &args.name)?;
    tune_allocator();
    // Read the file before starting, so that a bad file stops the agent with a clear error.
    let config_entries = match &args.config_file {
        Some(path) => Some(
            grapevine::agent::config_file::load(path)
                .map_err(|error| grapevine::Error::Config(error.to_string()))?,
        ),
        None => None,
    };
    let (mut seed_addrs, mut seed_names) = (Vec::new(), Vec::new());
    for seed in args.join {
        match seed {
            Seed::Addr(addr) => seed_addrs.push(addr),
            Seed::Name(name) => seed_names.push(name),
        }
    }
    let advertise = match args.advertise {
        Some(advertise) => Some(advertise),
        None if args.bind.ip().is_unspecified() => {
            let advertise = detect_advertise(args.bind, &seed_addrs, &seed_names)?;
            tracing::info!(
                %advertise,
                "advertising the address of the route to the cluster (set --advertise to choose)"
            );
            Some(advertise)
        }
        None => None,
    };
    let mut builder = Node::builder(args.name)
        .bind(args.bind)
        .seeds(seed_addrs)
        .seed_names(seed_names)
        .profile(args.profile)
        .allow_remote_control(args.allow_remote_control)
        .cluster_label(args.cluster_label.clone());
    if let Some(advertise) = advertise {
        builder = builder.advertise(advertise);
    }
    if let Some(dir) = &args.data_dir {
        builder = builder.data_dir(dir);
    }
    use grapevine::net::sealed::{Key, Keyring};
    if let Some(key) = &args.encrypt {
        let key = Key::from_base64(key)
            .map_err(|e| grapevine::Error::Config(format!("--encrypt: {e}")))?;
        builder = builder.keyring(Keyring::new(key));
    }
    if let Some(path) = &args.keyring {
        // Read at start and saved back after every rotation.
        builder = builder.keyring_file(path);
    }
    let http_token = match (&args.http_token, &args.http_token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    grapevine::Error::Config(format!("--http-token-file {}: {e}", path.display()))
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if http_token.as_deref().is_some_and(str::is_empty) {
        return Err(grapevine::Error::Config(
            "the HTTP token is empty; give a non-empty --http-token".to_string(),
        ));
    }
    if let Some(addr) = args.http {
        if !addr.ip().is_loopback() && http_token.is_none() {
            return Err(grapevine::Error::Config(format!(
                "--http {addr} is not a loopback address; give --http-token (or \
                 --http-token-file) so that only holders of the token reach the API"
            )));
        }
    }
    let node = std::sync::Arc::new(builder.start().await?);
    if let Some(dir) = &args.data_dir {
        tracing::info!(dir = %dir.display(), keys = node.config().key_count(), "data dir open");
    }
    let check_interval = match args.profile {
        Profile::Local => Duration::from_secs(1),
        Profile::Lan => Duration::from_secs(5),
        Profile::Wan => Duration::from_secs(15),
    };
    if let Some(entries) = config_entries {
        let count = node.config().set_all(entries).await?;
        tracing::info!(count, "config file imported");
    }
    for (service, check) in args.services {
        let id = service.id.clone();
        // Declared at every start: not saved in the data dir.
        let check = check.resolve(check_interval, args.no_check);
        node.register_declared(service, check).await?;
        tracing::info!(%id, "service registered");
    }
    let http = match args.http {
        Some(addr) => Some(
            grapevine::http::HttpServer::start(
                node.clone(),
                addr,
                grapevine::http::HttpOptions {
                    datacenter: args.cluster_label.clone(),
                    token: http_token.clone(),
                    max_wait: args.http_max_wait,
                    default_wait: args.http_max_wait.min(Duration::from_secs(300)),
                    max_bodies_in_flight: args.http_body_budget,
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| grapevine::Error::Config(error.to_string()))?,
        ),
        None => None,
    };
    let dns = match args.dns {
        Some(addr) => {
            let options = grapevine::dns::DnsOptions {
                domain: args.dns_domain.clone(),
                // Consul's datacenter is the cluster label: `web.service.LABEL.consul`.
                datacenter: Some(args.cluster_label.clone()),
                ttl: args.dns_ttl,
                node_ttl: args.dns_ttl,
                service_ttl: args.dns_service_ttl.iter().cloned().collect(),
                ..Default::default()
            };
            Some(
                grapevine::dns::DnsServer::bind(node.clone(), addr, options)
                    .await
                    .map_err(|error| grapevine::Error::Config(error.to_string()))?,
            )
        }
        None => None,
    };
    tracing::info!(addr = %node.addr(), "agent running; press Ctrl-C to leave");
    let left = async {
        match &http {
            Some(http) => http.left().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = left => {
            tracing::info!("left the cluster on request of the HTTP API (PUT /v1/agent/leave)");
            if let Some(http) = http {
                http.shutdown().await;
            }
            return Ok(ExitCode::SUCCESS);
        }
        () = wait_for_signal() => {}
    }
    tracing::info!("leaving the cluster");
    // The HTTP API and DNS stop first: their readers end before the node goes away.
    if let Some(dns) = dns {
        dns.shutdown().await;
    }
    if let Some(http) = http {
        http.shutdown().await;
    }
    node.leave().await?;
    Ok(ExitCode::SUCCESS)
}

/// The address to advertise when bound to an unspecified IP: the source address of the route
/// towards the first seed that has an address (or of the default route).
fn detect_advertise(
    bind: SocketAddr,
    addrs: &[SocketAddr],
    names: &[SeedName],
) -> grapevine::Result<SocketAddr> {
    let towards = addrs.first().copied().or_else(|| {
        names.iter().find_map(|name| {
            (name.host(), name.port())
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.find(|a| a.is_ipv4() == bind.is_ipv4()))
        })
    });
    grapevine::agent::advertise::detect(bind, towards).map_err(|error| {
        grapevine::Error::Config(format!(
            "bound to {bind} and no --advertise given: {error}; give --advertise IP:PORT"
        ))
    })
}

/// glibc keeps freed memory in per-thread arenas and gives little of it back, so a burst of
/// large buffers (an attack of huge partial frames, a catch-up sync) would leave the agent's
/// RSS high for good. Two arenas, buffers from 64 KiB in their own mappings (unmapped when
/// freed), and a periodic trim return it.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt and malloc_trim only change glibc's allocator settings and release
        // free memory; they are called before and beside allocations, as glibc permits.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        }
        tokio::spawn(async {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                // SAFETY: see above.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    }
}

fn init_logging(otlp_endpoint: Option<&str>, node: &str) -> grapevine::Result<Option<Telemetry>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes when stderr is a file or a pipe (container logs, journald).
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let telemetry = otlp_exporter(otlp_endpoint, node)?;
    #[cfg(feature = "opentelemetry")]
    let otel = telemetry.as_ref().map(|telemetry| telemetry.layer());
    #[cfg(not(feature = "opentelemetry"))]
    let otel: Option<tracing_subscriber::layer::Identity> = None;
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(telemetry)
}

#[cfg(feature = "opentelemetry")]
type Telemetry = grapevine::telemetry::Telemetry;
#[cfg(not(feature = "opentelemetry"))]
type Telemetry = std::convert::Infallible;

/// The OTLP exporter `--otlp-endpoint` asks for.
#[cfg(feature = "opentelemetry")]
fn otlp_exporter(endpoint: Option<&str>, node: &str) -> grapevine::Result<Option<Telemetry>> {
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    grapevine::telemetry::OtlpConfig::new(endpoint, "grapevine")
        .instance_id(node)
        .build()
        .map(Some)
        .map_err(|error| grapevine::Error::Config(format!("--otlp-endpoint: {error}")))
}

/// Without the feature there is no exporter: asking for one is an error, not a silent no-op.
#[cfg(not(feature = "opentelemetry"))]
fn otlp_exporter(endpoint: Option<&str>, _node: &str) -> grapevine::Result<Option<Telemetry>> {
    match endpoint {
        None => Ok(None),
        Some(_) => Err(grapevine::Error::Config(
            "--otlp-endpoint: this grapevine binary was built without OpenTelemetry; \
             rebuild it with `cargo build --release --features opentelemetry`"
                .into(),
        )),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    biased;
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
