//! `/metrics` over HTTP for Prometheus to scrape: one thread, one request
//! per connection (`Connection: close`), each bounded — 8 KiB of request
//! head, 2 s to send all of it, 2 s per write of the answer — so a stalled
//! scraper delays the next by seconds and never the store's own clients,
//! whose event loop this thread does not share.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use crate::error::{Error, Result};

/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request, and to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What renders a server's metrics, from any thread (see
/// [`super::Server::metrics_source`]).
#[derive(Clone)]
pub struct MetricsSource(pub(super) Arc<Metrics>);

impl MetricsSource {
    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        self.0.render()
    }
}

/// An HTTP endpoint serving `GET /metrics`. Dropping it stops it.
pub struct MetricsEndpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// Listens on `addr` (port 0 picks one) and serves `source`.
    pub fn start(addr: SocketAddr, source: MetricsSource) -> Result<MetricsEndpoint> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            Error::network(format!("the metrics endpoint cannot listen on {addr}: {e}"))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::network(format!("the metrics endpoint: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dc-metrics-{}", addr.port()))
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    match stream {
                        Ok(stream) => answer(stream, &source),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            log::warn!("metrics endpoint: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| Error::internal(format!("spawning the metrics thread: {e}")))?;
        Ok(MetricsEndpoint {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; a failure means it is gone already.
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, source: &MetricsSource) {
    // One deadline for the whole head, however it trickles in.
    let deadline = Instant::now() + IO_TIMEOUT;
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "");
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &source.render(),
        ),
        ("GET", "/") => respond(
            &mut stream,
            "200 OK",
            "text/plain; charset=utf-8",
            "distcore TCPStore server: metrics at /metrics\n",
        ),
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n"),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        ),
    }
}

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tcp::server::Quotas;

    /// The answer to `request` (as far as it came: a server that closes
    /// on a request it did not read whole may reset the connection).
    fn fetch(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn serves_metrics_and_refuses_everything_else() {
        let source = MetricsSource(Arc::new(Metrics::new(Quotas::default())));
        let endpoint = MetricsEndpoint::start("127.0.0.1:0".parse().unwrap(), source).unwrap();
        let addr = endpoint.local_addr();
        let ok = fetch(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(ok.contains("distcore_requests_total{command=\"get\"} 0"));
        let missing = fetch(addr, b"GET /keys HTTP/1.1\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = fetch(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let huge = fetch(addr, &vec![b'a'; 20 << 10]);
        assert!(
            huge.is_empty() || huge.starts_with("HTTP/1.1 431"),
            "{huge}"
        );
        // A scraper that says nothing, or trickles its request in, delays
        // the next by the timeout at most.
        let silent = TcpStream::connect(addr).unwrap();
        let trickler = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for _ in 0..8 {
                if s.write_all(b"G").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        });
        let started = Instant::now();
        let ok = fetch(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"));
        assert!(
            started.elapsed() < 3 * IO_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        drop(silent);
        trickler.join().unwrap();
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "stopped");
    }
}
