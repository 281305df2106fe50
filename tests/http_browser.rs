//! The sidecar HTTP API from outside: agent processes with `--http`, the status page in
//! headless Chromium (members, services, a crash turning a member down live, a screenshot),
//! and the Python example talking to an agent.
//!
//! Chromium (Debian's `chromium` package) and `python3` are optional on a developer's
//! machine: without them these tests print that they are skipped. CI (`.ci/http`) sets
//! `GRAPEVINE_REQUIRE_BROWSER=1`, which turns a missing tool into a failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_grapevine");
/// Set (to anything) to make a missing browser or Python a failure instead of a skip.
const REQUIRE: &str = "GRAPEVINE_REQUIRE_BROWSER";
/// How long the cluster may take to converge or to notice a crash.
const CONVERGE: Duration = Duration::from_secs(30);
/// Longest one browser run (DOM dump, screenshot) may take.
const BROWSER_RUN: Duration = Duration::from_secs(60);

/// A process killed (with its process group) and reaped on drop.
struct Guard {
    child: Child,
    group: bool,
}

impl Guard {
    fn kill(&mut self) {
        if self.group {
            // Chromium forks helpers: end the whole group we started, by its id.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(mut command: Command, group: bool) -> Guard {
    if group {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    Guard { child, group }
}

/// Runs `command` to completion, killing it after `limit`.
fn run_bounded(mut command: Command, limit: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let mut guard = Guard { child, group: true };
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = guard.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            guard.kill();
            panic!("{command:?} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Helpers may keep the pipes open after the browser exits: end the group first.
    guard.kill();
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A blocking `GET`; `None` if the server cannot be reached.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // Read until the body is complete: some servers (DevTools) keep the connection open.
    let mut raw = Vec::new();
    loop {
        let mut buf = [0u8; 8192];
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|length| raw.len() >= end + 4 + length) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((status, dechunk(body)));
    }
    Some((status, body.to_string()))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn json_get(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(addr, path)?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// An agent process with its HTTP API.
struct Agent {
    gossip: SocketAddr,
    http: SocketAddr,
    process: Guard,
}

impl Agent {
    fn start(name: &str, join: Option<SocketAddr>, extra: &[&str]) -> Agent {
        let gossip = local(free_port());
        let http = local(free_port());
        let mut command = Command::new(BIN);
        command.env("RUST_LOG", "warn").args([
            "agent",
            "--name",
            name,
            "--bind",
            &gossip.to_string(),
            "--profile",
            "local",
            "--http",
            &http.to_string(),
        ]);
        if let Some(seed) = join {
            command.args(["--join", &seed.to_string()]);
        }
        command.args(extra);
        let process = spawn(command, false);
        let agent = Agent {
            gossip,
            http,
            process,
        };
        wait_until(&format!("{name}'s HTTP API"), CONVERGE, || {
            http_get(agent.http, "/v1/agent/self").is_some()
        });
        agent
    }
}

fn find_tool(names: &[&str], env: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The tool, or `None` after printing that the test is skipped (a failure under CI).
fn required_tool(test: &str, names: &[&str], env: &str) -> Option<PathBuf> {
    let found = find_tool(names, env);
    if found.is_none() {
        assert!(
            std::env::var_os(REQUIRE).is_none(),
            "{REQUIRE} is set but none of {names:?} is on PATH (or in ${env})"
        );
        eprintln!(
            "skipped: {test} needs {} (set {REQUIRE}=1 to make this a failure)",
            names[0]
        );
    }
    found
}

fn browser_command(browser: &Path, profile: &Path) -> Command {
    let mut command = Command::new(browser);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,900",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// The page's DOM after its script has run.
fn dump_dom(browser: &Path, profile: &Path, url: &str) -> String {
    let mut command = browser_command(browser, profile);
    command.args(["--dump-dom", "--virtual-time-budget=4000", url]);
    let output = run_bounded(command, BROWSER_RUN);
    assert!(
        output.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The titles of the pages a browser with remote debugging has open.
fn page_titles(devtools: SocketAddr) -> Vec<String> {
    json_get(devtools, "/json/list")
        .and_then(|list| list.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|page| page["type"] == "page")
        .filter_map(|page| page["title"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn status_page_in_headless_chromium() {
    let Some(browser) = required_tool(
        "status_page_in_headless_chromium",
        &["chromium", "chromium-browser", "google-chrome"],
        "GRAPEVINE_CHROMIUM",
    ) else {
        return;
    };
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("http-browser-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    let a = Agent::start("a", None, &["--service", "web:8080:v1", "--no-check"]);
    let b = Agent::start(
        "b",
        Some(a.gossip),
        &["--service", "api:9090", "--no-check"],
    );
    let mut c = Agent::start(
        "c",
        Some(a.gossip),
        &["--service", "web:8081:v2", "--no-check"],
    );
    wait_until("3 alive members and 3 instances on a", CONVERGE, || {
        let members = json_get(a.http, "/v1/agent/members").unwrap_or_default();
        let services = json_get(a.http, "/v1/catalog/services").unwrap_or_default();
        members
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["Status"] == 1))
            && json_get(a.http, "/v1/catalog/service/web")
                .is_some_and(|w| w.as_array().is_some_and(|w| w.len() == 2))
            && services["api"] == serde_json::json!([])
    });
    let mut command = Command::new(BIN);
    command.args([
        "config",
        "set",
        "prod/web/greeting",
        "hello",
        "--agent",
        &b.gossip.to_string(),
    ]);
    assert!(run_bounded(command, Duration::from_secs(20))
        .status
        .success());
    wait_until("the config key on a", CONVERGE, || {
        http_get(a.http, "/v1/kv/prod/web/greeting").is_some_and(|(status, _)| status == 200)
    });
    let url = format!("http://{}/", a.http);

    // What the page shows once loaded.
    let dom = dump_dom(&browser, &work.join("profile-1"), &url);
    for name in ["a", "b", "c"] {
        let row = format!(r#"data-member="{name}" data-status="alive""#);
        assert!(dom.contains(&row), "{row} missing from the page:\n{dom}");
    }
    for (service, instance) in [
        ("web", "web-8080"),
        ("web", "web-8081"),
        ("api", "api-9090"),
    ] {
        let row =
            format!(r#"data-service="{service}" data-instance="{instance}" data-health="passing""#);
        assert!(dom.contains(&row), "{row} missing from the page:\n{dom}");
    }
    assert!(dom.contains(r#"data-key="prod/web/greeting""#), "{dom}");
    assert!(
        dom.contains("<title>grapevine: 3 alive, 0 down</title>"),
        "{dom}"
    );

    // One page left open: it refreshes itself and sees c go down after a crash.
    let profile = work.join("profile-live");
    let mut command = browser_command(&browser, &profile);
    command.args(["--remote-debugging-port=0", &url]);
    let mut live = spawn(command, true);
    let port_file = profile.join("DevToolsActivePort");
    let mut devtools = None;
    wait_until("the browser's DevTools port", CONVERGE, || {
        devtools = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u16>().ok())
            .map(local);
        devtools.is_some()
    });
    let devtools = devtools.unwrap();
    wait_until("the live page showing 3 alive", CONVERGE, || {
        page_titles(devtools)
            .iter()
            .any(|t| t == "grapevine: 3 alive, 0 down")
    });
    c.process.kill(); // kill -9: a crash, not a leave
    let started = Instant::now();
    wait_until("the live page showing c down", CONVERGE, || {
        page_titles(devtools)
            .iter()
            .any(|t| t == "grapevine: 2 alive, 1 down [c]")
    });
    eprintln!(
        "the open page showed c down {:.1} s after the crash",
        started.elapsed().as_secs_f64()
    );
    live.kill();

    // A fresh load agrees, and a screenshot records it.
    let dom = dump_dom(&browser, &work.join("profile-2"), &url);
    assert!(
        dom.contains(r#"data-member="c" data-status="down""#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"data-instance="web-8081" data-health="passing" data-node-status="down""#),
        "{dom}"
    );
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("http-status.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut command = browser_command(&browser, &work.join("profile-3"));
    command.args([
        &format!("--screenshot={}", screenshot.display()),
        "--virtual-time-budget=4000",
        &url,
    ]);
    let output = run_bounded(command, BROWSER_RUN);
    assert!(output.status.success(), "screenshot failed");
    let png = std::fs::read(&screenshot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a real screenshot"
    );
    eprintln!("screenshot: {}", screenshot.display());
    drop((a, b));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn python_sidecar_example() {
    let Some(python) = required_tool("python_sidecar_example", &["python3"], "GRAPEVINE_PYTHON")
    else {
        return;
    };
    let agent = Agent::start("py", None, &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sidecar.py");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .args(["--url", &format!("http://{}", agent.http)]);
    let output = run_bounded(command, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "examples/sidecar.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in ["registered", "found 1 passing", "watch saw"] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    // What the script left behind is visible through the API.
    let (status, raw) = http_get(agent.http, "/v1/kv/demo/sidecar/greeting?raw").unwrap();
    assert_eq!((status, raw.as_str()), (200, "hello from python, again"));
}

#[test]
fn http_on_a_public_address_needs_a_token() {
    let gossip = local(free_port());
    let mut command = Command::new(BIN);
    command.args([
        "agent",
        "--name",
        "x",
        "--bind",
        &gossip.to_string(),
        "--http",
        "0.0.0.0:0",
    ]);
    let output = run_bounded(command, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--http-token"), "{stderr}");
}
