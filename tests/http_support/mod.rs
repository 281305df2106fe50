//! A minimal HTTP/1.1 client for the HTTP API tests (no client crate needed): one request
//! per connection, `Content-Length` or chunked bodies, and an incremental SSE reader.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single test request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// An answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn index(&self) -> u64 {
        self.header("x-consul-index")
            .unwrap_or_else(|| panic!("no index header in {self:?}"))
            .parse()
            .unwrap()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The message of an error answer (plain text, as Consul's).
    pub fn error(&self) -> String {
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "not an error answer: {self:?}"
        );
        self.text()
    }
}

fn head(method: &str, path: &str, extra: &[(&str, &str)], length: Option<usize>) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(length) = length {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Sends one request and reads the whole answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    request_with(addr, method, path, &[], body).await
}

/// Sends one request with extra headers and reads the whole answer.
pub async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let length = (method != "GET" || !body.is_empty()).then_some(body.len());
        stream
            .write_all(head(method, path, extra, length).as_bytes())
            .await
            .unwrap();
        // A refused body may be answered before it is all sent: ignore write errors.
        let _ = stream.write_all(body).await;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        parse(&raw)
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {path} took longer than {REQUEST_TIMEOUT:?}"))
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, b"").await
}

pub async fn put(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    request(addr, "PUT", path, body).await
}

/// Header names and values, in order.
type Headers = Vec<(String, String)>;

/// Status, headers and where the body starts, once the head is complete.
fn split_head(raw: &[u8]) -> Option<(u16, Headers, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((status, headers, end + 4))
}

fn parse(raw: &[u8]) -> Reply {
    let (status, headers, start) = split_head(raw)
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(raw)));
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(&raw[start..]).0
    } else {
        raw[start..].to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// Decodes the complete chunks of `raw`; returns the data and how many bytes were used.
fn dechunk(raw: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = raw[at..].windows(2).position(|w| w == b"\r\n") else {
            return (out, at);
        };
        let size_text = String::from_utf8_lossy(&raw[at..at + line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, at);
        };
        let data_start = at + line_end + 2;
        if size == 0 || raw.len() < data_start + size + 2 {
            return (out, at);
        }
        out.extend_from_slice(&raw[data_start..data_start + size]);
        at = data_start + size + 2;
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// An open SSE stream.
pub struct SseStream {
    pub status: u16,
    stream: TcpStream,
    raw: Vec<u8>,
    text: String,
}

impl SseStream {
    pub async fn open(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> SseStream {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut headers = vec![("Accept", "text/event-stream")];
        headers.extend_from_slice(extra);
        stream
            .write_all(head("GET", path, &headers, None).as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        let (status, start) = loop {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf))
                .await
                .expect("SSE head timed out")
                .unwrap();
            assert!(n > 0, "closed before the head");
            raw.extend_from_slice(&buf[..n]);
            if let Some((status, _, start)) = split_head(&raw) {
                break (status, start);
            }
        };
        raw.drain(..start);
        SseStream {
            status,
            stream,
            raw,
            text: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` if the stream ended or `within` passed.
    pub async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (data, used) = dechunk(&self.raw);
            self.raw.drain(..used);
            self.text.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                        any = true;
                    }
                }
                if any {
                    event.data = data.join("\n");
                    return Some(event);
                }
            }
            let mut buf = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => self.raw.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Whether the server closed the stream within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
