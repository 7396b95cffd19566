//! A scriptable HTTP/1.1 target on a raw socket (or over TLS), recording every request
//! exactly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The request-target, raw (`/path?query`).
    pub target: String,
    /// Header names and values exactly as sent, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    /// The first value of a header (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value of a header (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Header names in order, lower-cased.
    pub fn header_names(&self) -> Vec<String> {
        self.headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// How the target answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Close the connection without answering.
    Close,
    /// Never answer (until the client gives up).
    Hang,
    /// Write these bytes as the whole answer, then close (for protocol errors).
    Raw(Vec<u8>),
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self::Status {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Self {
        match self {
            Self::Status {
                status,
                mut headers,
                body,
            } => {
                headers.push((name.into(), value.into()));
                Self::Status {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }

    pub fn with_body(self, bytes: &[u8]) -> Self {
        match self {
            Self::Status {
                status, headers, ..
            } => Self::Status {
                status,
                headers,
                body: bytes.to_vec(),
            },
            other => other,
        }
    }
}

type Script = dyn Fn(&Received, usize) -> Reply + Send + Sync;

struct Shared {
    received: parking_lot::Mutex<Vec<Received>>,
    arrived: Notify,
    script: Box<Script>,
}

/// A running target; stops when dropped.
pub struct Target {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Target {
    /// A target that answers 200 to everything.
    pub async fn ok() -> Self {
        Self::start(|_, _| Reply::status(200).with_body(b"ok")).await
    }

    /// A target whose answer to the `n`-th request (0-based) is `script(request, n)`.
    pub async fn start(script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_on(0, script).await
    }

    /// The same on a chosen port (to bring a stopped target back where it was).
    pub async fn start_on(
        port: u16,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], port)), script).await
    }

    /// The same on a chosen loopback address (`127.0.0.2:port`, …: several members of a
    /// DNS group on one port).
    pub async fn start_at(
        addr: SocketAddr,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::listen(addr, None, script).await
    }

    /// The same over TLS (HTTP/1.1 by ALPN) with `cert`, on a loopback port.
    pub async fn start_tls(
        cert: &crate::TestCert,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::listen(loopback, Some(cert.acceptor()), script).await
    }

    /// Serves on `addr`, each connection over TLS when an acceptor is given.
    async fn listen(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind target");
        let addr = listener.local_addr().expect("target addr");
        let shared = Arc::new(Shared {
            received: parking_lot::Mutex::new(Vec::new()),
            arrived: Notify::new(),
            script: Box::new(script),
        });
        let accept_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let shared = Arc::clone(&accept_shared);
                match tls.clone() {
                    None => connections.spawn(serve(stream, shared)),
                    Some(acceptor) => connections.spawn(async move {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve(stream, shared).await;
                        }
                    }),
                };
            }
        });
        Self { addr, shared, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.received.lock().len()
    }

    /// Waits until `n` requests have arrived; returns them (fails the test on timeout).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            {
                let got = self.shared.received.lock();
                if got.len() >= n {
                    return got.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.received();
                assert!(
                    got.len() >= n,
                    "target got {} of {n} requests in {timeout:?}: {got:#?}",
                    got.len()
                );
                return got;
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let n = {
            let mut received = shared.received.lock();
            received.push(request.clone());
            received.len() - 1
        };
        shared.arrived.notify_waiters();
        match (shared.script)(&request, n) {
            Reply::Close => return,
            Reply::Raw(bytes) => {
                let _ = stream.write_all(&bytes).await;
                return;
            }
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Reply::Status {
                status,
                headers,
                body,
            } => {
                let mut head = format!(
                    "HTTP/1.1 {status} Status\r\ncontent-length: {}\r\n",
                    body.len()
                );
                for (n, v) in headers {
                    head.push_str(&format!("{n}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if stream.write_all(head.as_bytes()).await.is_err()
                    || stream.write_all(&body).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Received> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if !fill(stream, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?.to_owned();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.push((name.to_owned(), value.trim().as_bytes().to_vec()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, Vec<u8>)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(stream, buf).await {
                    return None;
                }
            };
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&buf[..line_end]).trim(), 16).ok()?;
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                if !fill(stream, buf).await {
                    return None;
                }
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        let length: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < length {
            if !fill(stream, buf).await {
                return None;
            }
        }
        buf.drain(..length).collect()
    };
    Some(Received {
        method,
        target,
        headers,
        body,
        at: Instant::now(),
    })
}
