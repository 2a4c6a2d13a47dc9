//! `/metrics` over HTTP for Prometheus to scrape: one thread running a
//! small event loop of its own (never the store's), one request per
//! connection (`Connection: close`). Each scraper is bounded like a store
//! connection: at most [`MAX_SCRAPERS`] at once (one more is closed as
//! soon as accepted), 8 KiB of request head, and [`SCRAPE_TIMEOUT`] from
//! accept to the last byte of the answer, whatever it does meanwhile; so
//! silent or trickling connections delay nobody, and a scraper is answered
//! as soon as it has asked. Only peers the server's allow-list admits are
//! served.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::metrics::Metrics;
use crate::error::{Error, Result};
use crate::net::reactor::{Acceptor, ConnTable, LoopThread, LISTENER, WAKER};
use crate::security::access::Network;

/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// Time a scraper has from its connection to the end of the answer.
pub(crate) const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapers served at once.
pub(crate) const MAX_SCRAPERS: usize = 32;

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
    _running: LoopThread,
}

impl MetricsEndpoint {
    /// Listens on `addr` (port 0 picks one) and serves `source` to peers
    /// from the networks of `allow` (empty: any; others are closed as soon
    /// as accepted).
    pub fn start(
        addr: SocketAddr,
        source: MetricsSource,
        allow: &[Network],
    ) -> Result<MetricsEndpoint> {
        let failed = |e: io::Error| Error::network(format!("the metrics endpoint on {addr}: {e}"));
        let mut listener = TcpListener::bind(addr).map_err(|e| {
            Error::network(format!("the metrics endpoint cannot listen on {addr}: {e}"))
        })?;
        let addr = listener.local_addr().map_err(failed)?;
        let poll = Poll::new().map_err(failed)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(failed)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(failed)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut endpoint = Endpoint {
            poll,
            acceptor: Acceptor::new(listener, "metrics endpoint"),
            accept_retry: None,
            scrapes: ConnTable::default(),
            open: 0,
            source,
            allow: allow.to_vec(),
            stop: stop.clone(),
        };
        let running = LoopThread::spawn(
            "metrics endpoint",
            format!("dc-metrics-{}", addr.port()),
            stop,
            waker,
            move || endpoint.run(),
        )?;
        Ok(MetricsEndpoint {
            addr,
            _running: running,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One scraper's connection.
struct Scrape {
    stream: TcpStream,
    /// The request head so far (until the answer is ready).
    head: Vec<u8>,
    /// The answer, once the head is complete.
    answer: Vec<u8>,
    /// Bytes of the answer written.
    sent: usize,
    /// When it is closed, answered or not.
    deadline: Instant,
}

/// The endpoint's event loop.
struct Endpoint {
    poll: Poll,
    acceptor: Acceptor,
    /// When to accept again after running out of descriptors.
    accept_retry: Option<Instant>,
    scrapes: ConnTable<Scrape>,
    open: usize,
    source: MetricsSource,
    allow: Vec<Network>,
    stop: Arc<AtomicBool>,
}

impl Endpoint {
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        while !self.stop.load(Ordering::SeqCst) {
            let next = self.scrapes.iter_mut().map(|(_, s)| s.deadline).min();
            let timeout = [self.accept_retry, next]
                .into_iter()
                .flatten()
                .min()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                log::error!("metrics endpoint: poll failed, stopping: {e}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    token => self.progress(token),
                }
            }
            let now = Instant::now();
            if self.accept_retry.is_some_and(|at| at <= now) {
                self.accept();
            }
            let late: Vec<Token> = self
                .scrapes
                .iter_mut()
                .filter(|(_, s)| s.deadline <= now)
                .map(|(token, _)| token)
                .collect();
            for token in late {
                self.close(token);
            }
        }
    }

    fn accept(&mut self) {
        let now = Instant::now();
        let (scrapes, open) = (&mut self.scrapes, &mut self.open);
        let (allow, registry) = (&self.allow, self.poll.registry());
        self.accept_retry = self.acceptor.accept(now, |mut stream, peer| {
            let allowed = allow.is_empty() || allow.iter().any(|n| n.contains(peer.ip()));
            if !allowed || *open >= MAX_SCRAPERS {
                return;
            }
            let token = scrapes.next_token();
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = registry.register(&mut stream, token, interest) {
                log::warn!("metrics endpoint: registering {peer}: {e}");
                return;
            }
            scrapes.insert(Scrape {
                stream,
                head: Vec::new(),
                answer: Vec::new(),
                sent: 0,
                deadline: now + SCRAPE_TIMEOUT,
            });
            *open += 1;
        });
    }

    /// Reads what the scraper sent, then writes the answer as far as the
    /// socket takes it; closes the connection once answered or broken.
    fn progress(&mut self, token: Token) {
        let Some(scrape) = self.scrapes.get_mut(token) else {
            return;
        };
        let done = match scrape.step(&self.source) {
            Ok(done) => done,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(_) => true,
        };
        if done {
            self.close(token);
        }
    }

    fn close(&mut self, token: Token) {
        if self.scrapes.remove(token).is_some() {
            self.open -= 1;
        }
    }
}

impl Scrape {
    /// Moves the exchange on; true once it is over.
    fn step(&mut self, source: &MetricsSource) -> io::Result<bool> {
        let mut buf = [0u8; 1024];
        while self.answer.is_empty() {
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Ok(true);
            }
            self.head.extend_from_slice(&buf[..n]);
            if self.head.len() > MAX_HEAD {
                self.answer = response("431 Request Header Fields Too Large", "", "");
            } else if self.head.windows(4).any(|w| w == b"\r\n\r\n")
                || self.head.windows(2).any(|w| w == b"\n\n")
            {
                self.answer = answer(&self.head, source);
            }
        }
        while self.sent < self.answer.len() {
            match self.stream.write(&self.answer[self.sent..])? {
                0 => return Ok(true),
                n => self.sent += n,
            }
        }
        Ok(true)
    }
}

/// The answer to a request whose head is `head`.
fn answer(head: &[u8], source: &MetricsSource) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => response(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &source.render(),
        ),
        ("GET", "/") => response(
            "200 OK",
            "text/plain; charset=utf-8",
            "distcore TCPStore server: metrics at /metrics\n",
        ),
        ("GET", _) => response("404 Not Found", "text/plain", "not found\n"),
        _ => response("405 Method Not Allowed", "text/plain", "GET only\n"),
    }
}

/// An HTTP response with `status` and `body`.
fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tcp::server::Quotas;
    use std::net::TcpStream;

    /// The answer to `request` (as far as it came: a server that closes
    /// on a request it did not read whole may reset the connection).
    fn fetch(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn endpoint(allow: &[Network]) -> MetricsEndpoint {
        let source = MetricsSource(Arc::new(Metrics::new(Quotas::default(), None)));
        MetricsEndpoint::start("127.0.0.1:0".parse().unwrap(), source, allow).unwrap()
    }

    #[test]
    fn serves_metrics_and_refuses_everything_else() {
        let endpoint = endpoint(&[]);
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
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "stopped");
    }

    #[test]
    fn silent_and_trickling_scrapers_delay_nobody_and_are_closed_in_time() {
        let endpoint = endpoint(&[]);
        let addr = endpoint.local_addr();
        // More silent connections than it serves at once (the excess is
        // closed at once), and one trickling its request in.
        let mut silent: Vec<TcpStream> = (0..MAX_SCRAPERS + 100)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let trickler = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for _ in 0..8 {
                if s.write_all(b"G").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        });
        // The budget is full of silent scrapers: a scrape gets in as soon
        // as their time is up, not after each in turn.
        let started = Instant::now();
        // One timeout after the silent ones came, not one per silent
        // connection (minutes); a loaded machine gets slack.
        let deadline = started + 5 * SCRAPE_TIMEOUT;
        let ok = loop {
            let answer = fetch(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
            if !answer.is_empty() || Instant::now() > deadline {
                break answer;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok:?}");
        assert!(
            started.elapsed() < 5 * SCRAPE_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        // Each silent one was closed by then.
        for s in &mut silent {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_)));
        }
        trickler.join().unwrap();
    }

    #[test]
    fn scrapers_outside_the_allow_list_are_closed_unanswered() {
        let elsewhere = Network::parse_list("10.0.0.0/8").unwrap();
        let endpoint = endpoint(&elsewhere);
        assert_eq!(
            fetch(endpoint.local_addr(), b"GET /metrics HTTP/1.0\r\n\r\n"),
            ""
        );
        let here = Network::parse_list("10.0.0.0/8,127.0.0.0/8").unwrap();
        let endpoint = super::tests::endpoint(&here);
        let ok = fetch(endpoint.local_addr(), b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
    }
}
