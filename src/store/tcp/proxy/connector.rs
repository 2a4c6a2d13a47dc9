//! Upstream connections for the proxy, made off its event loop: a few
//! threads run the client's own connect and handshake (retries with
//! backoff, TLS, the secret, the server's proof checked) and hand the
//! result back through the loop's waker.

use std::net::TcpStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use mio::{Token, Waker};
use parking_lot::Mutex;

use super::super::client::{deadline_of, Conn, Endpoint};
use super::super::protocol::Limits;
use crate::error::{Error, Result};
use crate::net::wire::Session;

/// An upstream connection through its handshake: its socket, its TLS
/// session, the server's limits.
pub(super) type Upstream = (TcpStream, Option<Session>, Limits);

/// A connection made (or not) for the local connection of `pair`.
pub(super) struct Connected {
    pub(super) pair: Token,
    /// The local connection's serial: a slot reused meanwhile is another's.
    pub(super) serial: u64,
    pub(super) upstream: Result<Upstream>,
}

/// Threads making upstream connections.
pub(super) struct Connector {
    jobs: Sender<(Token, u64)>,
    done: Arc<Mutex<Vec<Connected>>>,
}

impl Connector {
    /// Starts `threads` threads connecting to `endpoint`, each connection
    /// given `timeout` (retrying a server that is not there until then);
    /// every result wakes the loop through `waker`.
    pub(super) fn start(
        endpoint: Endpoint,
        timeout: Duration,
        threads: usize,
        waker: Arc<Waker>,
    ) -> Result<Connector> {
        let (jobs, queue) = channel::<(Token, u64)>();
        let queue = Arc::new(Mutex::new(queue));
        let done = Arc::new(Mutex::new(Vec::new()));
        for i in 0..threads.max(1) {
            let (queue, done, waker) = (queue.clone(), done.clone(), waker.clone());
            let endpoint = endpoint.clone();
            std::thread::Builder::new()
                .name(format!("dc-proxy-connect-{i}"))
                .spawn(move || connect_loop(&endpoint, timeout, &queue, &done, &waker))
                .map_err(|e| Error::internal(format!("spawning a proxy thread: {e}")))?;
        }
        Ok(Connector { jobs, done })
    }

    /// Asks for an upstream connection for `pair`'s local connection.
    pub(super) fn request(&self, pair: Token, serial: u64) {
        // The threads outlive the sender: a send cannot fail.
        let _ = self.jobs.send((pair, serial));
    }

    /// The connections made since the last call.
    pub(super) fn take_done(&self) -> Vec<Connected> {
        std::mem::take(&mut *self.done.lock())
    }
}

/// One connecting thread: until the connector is dropped.
fn connect_loop(
    endpoint: &Endpoint,
    timeout: Duration,
    queue: &Mutex<Receiver<(Token, u64)>>,
    done: &Mutex<Vec<Connected>>,
    waker: &Waker,
) {
    loop {
        let next = queue.lock().recv();
        let Ok((pair, serial)) = next else {
            return;
        };
        let upstream =
            Conn::connect(endpoint, deadline_of(timeout)).and_then(|conn| conn.into_relayed());
        done.lock().push(Connected {
            pair,
            serial,
            upstream,
        });
        // A loop that has stopped has nothing to be told.
        let _ = waker.wake();
    }
}
