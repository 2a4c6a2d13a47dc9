//! One blocking client connection to a TCPStore server (ours or PyTorch's):
//! connect with retries, VALIDATE + PING, the distcore HELLO probe, framed
//! reads with timeouts, and WAIT with PyTorch's cancel-wait handshake.

use std::io::{BufReader, ErrorKind, IoSlice, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::protocol::{
    Command, Encoder, HELLO_ACK, HELLO_NONCE, STOP_WAITING, VALIDATE_MAGIC, WAIT_CANCELED,
};
use crate::bigbuf::{zeroed_vec, LARGE_VALUE_LEN};
use crate::error::{Error, Result, Status};
use crate::sendv::send_vectored;

/// Exponential backoff of connection attempts (PyTorch's values).
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MULTIPLIER: f64 = 1.5;
const BACKOFF_RANDOMIZATION: f64 = 0.5;
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long to wait for the answer to CANCEL_WAIT when the wait itself had
/// no timeout to borrow from.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// Sends every byte of `parts`, in order.
fn send_all(stream: &TcpStream, mut parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !parts.is_empty() {
        match send_vectored(stream, parts) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a wait ended.
pub(crate) enum WaitOutcome<T> {
    /// The server said STOP_WAITING (with the values, for WAIT_GET).
    Ready(T),
    /// The timeout passed and the server confirmed the cancel.
    TimedOut,
}

/// A validated connection. Not thread-safe by itself: the store guards it.
pub(crate) struct Connection {
    reader: BufReader<TcpStream>,
    peer: String,
    /// The peer is a distcore server that accepted the HELLO probe.
    extended: bool,
    /// Why the connection can no longer be used (out of sync or closed).
    broken: Option<String>,
    read_timeout: Option<Duration>,
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| Error::network(format!("cannot resolve {host}:{port}: {e}")))
}

impl Connection {
    /// Connects to `host:port`, retrying with exponential backoff and jitter
    /// until `timeout` (zero: forever), then validates the connection and
    /// probes for the distcore extensions.
    pub(crate) fn connect(host: &str, port: u16, timeout: Duration) -> Result<Connection> {
        let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
        let mut delay = BACKOFF_INITIAL;
        let mut last_error;
        loop {
            match Connection::attempt(host, port, deadline) {
                Ok(conn) => return Ok(conn),
                Err(e) if e.status() == Status::Network => last_error = e,
                Err(e) => return Err(e),
            }
            let jitter = 1.0 + BACKOFF_RANDOMIZATION * (2.0 * fastrand::f64() - 1.0);
            let mut sleep = delay.mul_f64(jitter);
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sleep = sleep.min(left);
            }
            std::thread::sleep(sleep);
            delay = delay.mul_f64(BACKOFF_MULTIPLIER).min(BACKOFF_MAX);
        }
        Err(Error::network(format!(
            "The client socket has timed out after {}ms while trying to connect to ({host}, {port}): {}",
            timeout.as_millis(),
            last_error.message()
        )))
    }

    fn attempt(host: &str, port: u16, deadline: Option<Instant>) -> Result<Connection> {
        let mut last = Error::network(format!("no address for {host}:{port}"));
        for addr in resolve(host, port)? {
            let left = deadline.map_or(Duration::from_secs(60), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let stream = match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1)))
            {
                Ok(stream) => stream,
                Err(e) => {
                    last = Error::network(format!("connect to {addr}: {e}"));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut conn = Connection {
                reader: BufReader::with_capacity(64 << 10, stream),
                peer: addr.to_string(),
                extended: false,
                broken: None,
                read_timeout: None,
            };
            let handshake_timeout = left.clamp(Duration::from_millis(1), Duration::from_secs(30));
            match conn.handshake(handshake_timeout) {
                Ok(()) => return Ok(conn),
                Err(e) => last = Error::network(format!("validating {addr}: {}", e.message())),
            }
        }
        Err(last)
    }

    /// VALIDATE, PING with our pid as PyTorch does, then the HELLO probe.
    fn handshake(&mut self, timeout: Duration) -> Result<()> {
        let nonce = std::process::id();
        let mut hello = Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish();
        hello.extend(Encoder::request(Command::Ping).u32(nonce).finish());
        hello.extend(Encoder::request(Command::Ping).u32(HELLO_NONCE).finish());
        self.send(&hello)?;
        if self.read_u32(Some(timeout))? != nonce {
            return Err(Error::network(
                "the server answered PING with a different nonce",
            ));
        }
        self.extended = match self.read_u32(Some(timeout))? {
            HELLO_ACK => true,
            HELLO_NONCE => false,
            other => {
                return Err(Error::network(format!(
                    "unexpected PING answer 0x{other:08x}"
                )))
            }
        };
        Ok(())
    }

    /// Whether the peer speaks the distcore extensions.
    pub(crate) fn extended(&self) -> bool {
        self.extended
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::network(format!(
                "the connection to the TCPStore at {} is unusable: {why}",
                self.peer
            ))),
            None => Ok(()),
        }
    }

    fn break_with(&mut self, error: Error) -> Error {
        self.broken
            .get_or_insert_with(|| error.message().to_string());
        error
    }

    /// Sends a request that has no reply (`head` then `value`), after
    /// checking that the server has not closed the connection: without a
    /// reply to wait for, a dead server would otherwise go unnoticed.
    pub(crate) fn send_unanswered(&mut self, head: &[u8], value: &[u8]) -> Result<()> {
        self.check_usable()?;
        if !self.reader.buffer().is_empty() {
            let e = Error::new(
                Status::Protocol,
                format!("unexpected bytes from the TCPStore at {}", self.peer),
            );
            return Err(self.break_with(e));
        }
        let mut byte = 0u8;
        let fd = self.reader.get_ref().as_raw_fd();
        // SAFETY: a one-byte peek into a live local.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let error = match n {
            0 => Some(format!(
                "the TCPStore at {} closed the connection",
                self.peer
            )),
            n if n > 0 => Some(format!(
                "unexpected bytes from the TCPStore at {}",
                self.peer
            )),
            _ => {
                let e = std::io::Error::last_os_error();
                (e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted)
                    .then(|| format!("connection to the TCPStore at {}: {e}", self.peer))
            }
        };
        if let Some(why) = error {
            return Err(self.break_with(Error::network(why)));
        }
        self.send_parts(head, value)
    }

    /// Sends a whole request.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.send_parts(bytes, &[])
    }

    /// Sends a request in two parts, so a value goes out from the caller's
    /// buffer without being copied into the request: one vectored write, or
    /// for a large value ([`LARGE_VALUE_LEN`]) a send of its own.
    fn send_parts(&mut self, head: &[u8], value: &[u8]) -> Result<()> {
        self.check_usable()?;
        let stream = self.reader.get_mut();
        let result = if value.is_empty() {
            send_all(stream, &mut [IoSlice::new(head)])
        } else if value.len() >= LARGE_VALUE_LEN {
            send_all(stream, &mut [IoSlice::new(head)])
                .and_then(|()| send_all(stream, &mut [IoSlice::new(value)]))
        } else {
            send_all(stream, &mut [IoSlice::new(head), IoSlice::new(value)])
        };
        result.map_err(|e| {
            let error = Error::network(format!("sending to the TCPStore at {}: {e}", self.peer));
            self.break_with(error)
        })
    }

    /// Reads exactly `buf.len()` bytes, waiting at most `timeout` (`None`:
    /// forever). A timeout before the first byte leaves the connection
    /// usable; one in the middle of a reply breaks it.
    fn read_exact(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> Result<()> {
        self.check_usable()?;
        if self.read_timeout != timeout {
            if let Err(e) = self.reader.get_ref().set_read_timeout(timeout) {
                return Err(Error::network(format!("setting a socket timeout: {e}")));
            }
            self.read_timeout = timeout;
        }
        let mut filled = 0;
        while filled < buf.len() {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => {
                    let e = Error::network(format!(
                        "the TCPStore at {} closed the connection",
                        self.peer
                    ));
                    return Err(self.break_with(e));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let e = Error::timeout(format!(
                        "no reply from the TCPStore at {} within {}ms",
                        self.peer,
                        timeout.unwrap_or_default().as_millis()
                    ));
                    return Err(if filled == 0 { e } else { self.break_with(e) });
                }
                Err(e) => {
                    let e =
                        Error::network(format!("reading from the TCPStore at {}: {e}", self.peer));
                    return Err(self.break_with(e));
                }
            }
        }
        Ok(())
    }

    /// Reads a reply field that must arrive within `timeout`; a timeout
    /// breaks the connection (the reply may still come and desync it).
    fn read_array<const N: usize>(&mut self, timeout: Option<Duration>) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_exact(&mut buf, timeout).map_err(|e| {
            if e.status() == Status::Timeout {
                self.break_with(e)
            } else {
                e
            }
        })?;
        Ok(buf)
    }

    pub(crate) fn read_u8(&mut self, timeout: Option<Duration>) -> Result<u8> {
        Ok(self.read_array::<1>(timeout)?[0])
    }

    pub(crate) fn read_u32(&mut self, timeout: Option<Duration>) -> Result<u32> {
        Ok(u32::from_le_bytes(self.read_array(timeout)?))
    }

    pub(crate) fn read_i64(&mut self, timeout: Option<Duration>) -> Result<i64> {
        Ok(i64::from_le_bytes(self.read_array(timeout)?))
    }

    /// Reads a `u64 length` + bytes field.
    pub(crate) fn read_bytes(&mut self, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let len = u64::from_le_bytes(self.read_array(timeout)?);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::new(
                    Status::Protocol,
                    format!("reply length {len} is impossible"),
                )
            })?;
        let mut value = zeroed_vec(len);
        if let Err(e) = self.read_exact(&mut value, timeout) {
            return Err(self.break_with(e));
        }
        Ok(value)
    }

    /// After sending a WAIT-like request, reads its STOP_WAITING (then
    /// `read_rest`, e.g. the values of WAIT_GET) or, when `timeout` passes,
    /// sends CANCEL_WAIT and reads the server's answer. STOP_WAITING may
    /// already be on the wire before WAIT_CANCELED: then the wait succeeded.
    pub(crate) fn await_stop<T>(
        &mut self,
        timeout: Duration,
        mut read_rest: impl FnMut(&mut Connection) -> Result<T>,
    ) -> Result<WaitOutcome<T>> {
        let first = if timeout.is_zero() {
            Some(self.read_u8(None)?)
        } else {
            match self.read_exact_u8(timeout) {
                Ok(byte) => Some(byte),
                Err(e) if e.status() == Status::Timeout => None,
                Err(e) => return Err(e),
            }
        };
        let grace = Some(if timeout.is_zero() {
            CANCEL_GRACE
        } else {
            timeout.max(CANCEL_GRACE)
        });
        match first {
            Some(STOP_WAITING) => return Ok(WaitOutcome::Ready(read_rest(self)?)),
            Some(other) => return Err(self.unexpected(other)),
            None => {}
        }
        self.send(&Encoder::request(Command::CancelWait).finish())?;
        match self.read_u8(grace)? {
            WAIT_CANCELED => Ok(WaitOutcome::TimedOut),
            STOP_WAITING => {
                let value = read_rest(self)?;
                match self.read_u8(grace)? {
                    WAIT_CANCELED => Ok(WaitOutcome::Ready(value)),
                    other => Err(self.unexpected(other)),
                }
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// Reads one byte, leaving the connection usable if none came in time.
    fn read_exact_u8(&mut self, timeout: Duration) -> Result<u8> {
        let mut byte = [0u8; 1];
        self.read_exact(&mut byte, Some(timeout))?;
        Ok(byte[0])
    }

    fn unexpected(&mut self, byte: u8) -> Error {
        let e = Error::new(
            Status::Protocol,
            format!("unexpected wait reply byte {byte} from {}", self.peer),
        );
        self.break_with(e)
    }
}
