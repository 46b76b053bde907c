//! The HTTP endpoint: Prometheus `/metrics`, `/healthz` and `/readyz`, with bounds
//! on its clients.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::obs::Metrics;
use crate::PipelineError;

/// Bounds on the HTTP endpoint's clients (one process shares its file descriptors
/// and memory between the stream and this endpoint).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A request's headers must arrive within this (slowloris).
    pub header_read_timeout: Duration,
    /// A connection is closed after this, whatever it does (idle keep-alive included).
    pub connection_timeout: Duration,
    /// Connections served at once. At the limit, a new connection closes the
    /// oldest open one (a slow or idle client, since a probe's request takes
    /// milliseconds), so slow clients cannot starve `/healthz`.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { header_read_timeout: Duration::from_secs(10), connection_timeout: Duration::from_secs(60), max_connections: 64 }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listen` until the runtime stops.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve_http(listen: &str, registry: prometheus::Registry, metrics: Arc<Metrics>) -> Result<std::net::SocketAddr, PipelineError> {
    serve_http_with(listen, registry, metrics, HttpLimits::default()).await
}

/// [`serve_http`] with explicit limits.
pub async fn serve_http_with(listen: &str, registry: prometheus::Registry, metrics: Arc<Metrics>, limits: HttpLimits) -> Result<std::net::SocketAddr, PipelineError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| PipelineError::config("http.listen", format!("{listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| PipelineError::io(format!("the HTTP endpoint on {listen}"), e))?;
    tracing::info!(%addr, max_connections = limits.max_connections, "serving /metrics, /healthz and /readyz");
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // Open connections by age (ids ascend): at the limit the oldest is told to close.
    let open: Arc<Mutex<BTreeMap<u64, Arc<tokio::sync::Notify>>>> = Arc::default();
    tokio::spawn(async move {
        let mut next_id = 0u64;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // e.g. out of file descriptors: back off rather than spin.
                    tracing::warn!(error = %e, "HTTP endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // At the limit: close the oldest connection and take its slot. A
                    // slowloris or idle client is always older than a probe's
                    // millisecond request, so it goes first; a flood costs accepts.
                    let oldest = open.lock().expect("http conns lock").pop_first();
                    if let Some((_, close)) = oldest {
                        close.notify_one();
                    }
                    match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned()).await {
                        Ok(Ok(p)) => p,
                        _ => {
                            tracing::debug!(%peer, "HTTP endpoint: connection limit reached; closed");
                            drop(stream);
                            continue;
                        }
                    }
                }
            };
            let id = next_id;
            next_id += 1;
            let close = Arc::new(tokio::sync::Notify::new());
            open.lock().expect("http conns lock").insert(id, close.clone());
            let (registry, metrics, open) = (registry.clone(), metrics.clone(), open.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (code, ctype, body) = respond_http(req.method(), req.uri().path(), &registry, &metrics);
                    async move {
                        hyper::Response::builder()
                            .status(code)
                            .header(hyper::header::CONTENT_TYPE, ctype)
                            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                // Dropping the connection future closes the socket.
                tokio::select! {
                    r = tokio::time::timeout(limits.connection_timeout, conn) => {
                        if r.is_err() {
                            tracing::debug!(%peer, "HTTP connection closed: connection timeout");
                        }
                    }
                    _ = close.notified() => tracing::debug!(%peer, "HTTP connection closed: the oldest, at the connection limit"),
                }
                open.lock().expect("http conns lock").remove(&id);
                drop(permit);
            });
        }
    });
    Ok(addr)
}

fn respond_http(method: &hyper::Method, path: &str, registry: &prometheus::Registry, m: &Metrics) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return (405, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => match prometheus::TextEncoder::new().encode_to_string(&registry.gather()) {
            Ok(text) => (200, prometheus::TEXT_FORMAT, text),
            Err(e) => (500, TEXT, format!("encoding metrics: {e}\n")),
        },
        "/healthz" => match m.health() {
            Ok(()) => (200, TEXT, "ok\n".into()),
            Err(why) => (503, TEXT, format!("unhealthy: {why}\n")),
        },
        "/readyz" => {
            if m.ready.load(Relaxed) == 1 {
                (200, TEXT, "ready\n".into())
            } else {
                (503, TEXT, "not ready: partitions not assigned or state not restored yet\n".into())
            }
        }
        _ => (404, TEXT, "not found: try /metrics, /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use super::*;

    fn get(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// The HTTP endpoint bounds its clients: a slowloris connection (one header byte
    /// a second) is closed at the header-read timeout, and with more slow
    /// connections open than it serves at once, the endpoint still answers a probe
    /// at once (the oldest connection is closed to make room), well before any
    /// timeout would free a slot.
    #[test]
    fn http_endpoint_closes_slowloris_and_answers_past_slow_connections() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let limits = HttpLimits { header_read_timeout: Duration::from_secs(2), connection_timeout: Duration::from_secs(30), max_connections: 8 };
        let addr = rt.block_on(serve_http_with("127.0.0.1:0", prometheus::Registry::new(), Arc::new(Metrics::default()), limits)).unwrap();
        assert_eq!(get(addr, "/healthz"), Some(200));

        // Slowloris: a header that never ends, one byte a second.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(900))).unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sent = 0;
        let closed = loop {
            let mut buf = [0u8; 256];
            match slow.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => break true, // an error response (408), then the close
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break true,
            }
            if slow.write_all(b"X").is_err() {
                break true;
            }
            sent += 1;
            if Instant::now() > deadline {
                break false;
            }
        };
        assert!(closed, "the slowloris connection is still open after {sent} bytes");

        // More idle connections than slots, on an endpoint whose header timeout is
        // far away: each new connection past the limit closes the oldest, so the
        // endpoint answers at once and never holds more than its limit.
        let patient = HttpLimits { header_read_timeout: Duration::from_secs(300), connection_timeout: Duration::from_secs(300), max_connections: 8 };
        let addr = rt.block_on(serve_http_with("127.0.0.1:0", prometheus::Registry::new(), Arc::new(Metrics::default()), patient)).unwrap();
        let mut idle: Vec<TcpStream> = Vec::new();
        for _ in 0..patient.max_connections * 3 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            idle.push(s);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(get(addr, "/healthz"), Some(200), "a probe past {} slow connections", idle.len());
        // The oldest were closed by the server; at most `max_connections` stay open.
        std::thread::sleep(Duration::from_millis(500));
        let still_open = idle
            .iter_mut()
            .filter(|s| {
                let s: &TcpStream = s;
                s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut buf = [0u8; 64];
                matches!((&mut &*s).read(&mut buf), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
            })
            .count();
        assert!(still_open <= patient.max_connections, "{still_open} slow connections still open, limit {}", patient.max_connections);
        assert!(still_open > 0, "the newest slow connections should still be served");
    }
}
