//! TLS (rustls, with ring's cryptography) between distcore peers: a
//! TCPStore's clients and server, and RPC workers.
//!
//! [`TlsServer`] and [`TlsClient`] are read once from PEM files (a
//! certificate chain, its private key, and the CA certificates that vouch
//! for the other side) and shared by every connection. A [`Session`] is one
//! connection's TLS state; [`Wire`] moves its bytes over a non-blocking
//! socket, or moves them in clear when there is no session, so the event
//! loops and the client have one way to read and write either.
//!
//! TLS 1.3 and 1.2 with rustls's safe defaults; no session resumption
//! across processes. Each session buffers at most [`BUFFER_LIMIT`] bytes of
//! records to send (what a server holds per connection beyond its outbox),
//! and rustls bounds what it holds of records received.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

use crate::error::{Error, Result};
use crate::sendv::send_bytes;

/// Bytes of TLS records a session holds before its socket takes them; a
/// write beyond it waits for the socket (see [`Wire::send`]).
pub(crate) const BUFFER_LIMIT: usize = 64 << 10;

/// The first byte of a TLS connection (a handshake record). No TCPStore
/// request starts with it, so a server serving both tells them apart by
/// this byte.
pub(crate) const HANDSHAKE_RECORD: u8 = 0x16;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::invalid_argument(format!("reading {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid_argument(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::invalid_argument(format!(
            "reading the TLS private key {}: {e} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)",
            path.display()
        ))
    })
}

fn roots(path: &Path, what: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, what)? {
        roots
            .add(cert)
            .map_err(|e| Error::invalid_argument(format!("{what} {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

fn config_error(what: &str, e: rustls::Error) -> Error {
    Error::invalid_argument(format!("{what}: {e}"))
}

/// A TLS server's identity: its certificate chain and key, and, for mutual
/// TLS, the CA certificates its clients' certificates must chain to.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    verifies_clients: bool,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads the certificate chain at `cert` (PEM, the server's own first),
    /// the private key at `key` (PEM), and, with `client_ca`, the CA
    /// certificates (PEM) that every client must present a certificate
    /// from. Errors (`InvalidArgument`) name the file and what is wrong.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsServer> {
        let chain = certificates(cert, "the TLS certificate file")?;
        let key = private_key(key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS versions", e))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = roots(path, "the TLS client CA file")?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| {
                        Error::invalid_argument(format!(
                            "the TLS client CA file {}: {e}",
                            path.display()
                        ))
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| config_error("the TLS certificate and key", e))?;
        Ok(TlsServer {
            config: Arc::new(config),
            verifies_clients: client_ca.is_some(),
        })
    }

    /// A session for a connection just accepted.
    pub(crate) fn session(&self) -> Result<Session> {
        let conn = ServerConnection::new(self.config.clone())
            .map_err(|e| Error::internal(format!("starting a TLS session: {e}")))?;
        Ok(Session::new(conn.into()))
    }

    /// Whether clients must present a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }
}

/// What a TLS client trusts (the CA certificates a server's certificate
/// must chain to), and its own certificate for servers that ask for one.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Reads the CA certificates at `ca` (PEM) and, with `identity`, the
    /// client's certificate chain and private key (PEM files), presented
    /// to servers that verify clients. Errors (`InvalidArgument`) name the
    /// file and what is wrong.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<TlsClient> {
        let roots = roots(ca, "the TLS CA file")?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("TLS versions", e))?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    certificates(cert, "the TLS certificate file")?,
                    private_key(key)?,
                )
                .map_err(|e| config_error("the TLS client certificate and key", e))?,
        };
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Checks servers' certificates against `name` (a DNS name or an IP
    /// address) instead of the host connected to.
    pub fn with_server_name(mut self, name: impl Into<String>) -> TlsClient {
        self.server_name = Some(name.into());
        self
    }

    /// A session for a connection to `host` (a name or an address): the
    /// server's certificate must be valid for it, or for the server name
    /// set.
    pub(crate) fn session(&self, host: &str) -> Result<Session> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = match name.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(name.to_owned()).map_err(|e| {
                Error::invalid_argument(format!("'{name}' is not a TLS server name: {e}"))
            })?,
        };
        let conn = ClientConnection::new(self.config.clone(), server_name)
            .map_err(|e| Error::internal(format!("starting a TLS session: {e}")))?;
        Ok(Session::new(conn.into()))
    }
}

/// The TLS files of one process, as the C API, the bindings and the CLI
/// take them: paths to PEM files, each optional.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// A certificate chain (its own certificate first): a server serves
    /// TLS with it; a client presents it to servers that verify clients.
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    pub key: Option<PathBuf>,
    /// Connect over TLS, trusting these CA certificates.
    pub ca: Option<PathBuf>,
    /// A server: require clients' certificates from these CAs.
    pub client_ca: Option<PathBuf>,
    /// Check servers' certificates against this name instead of the host.
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// What the files make for a process that `serves` (a server, with
    /// its own client handle) or only connects: the server's TLS if it
    /// serves with a certificate, the client's if it has a CA file.
    /// Combinations that would not do what they say are
    /// `InvalidArgument`, as are unreadable files.
    pub fn load(&self, serves: bool) -> Result<(Option<TlsServer>, Option<TlsClient>)> {
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(Error::invalid_argument(
                    "a TLS certificate and its private key go together: give both or neither",
                ))
            }
        };
        let serving = identity.filter(|_| serves);
        if self.client_ca.is_some() && serving.is_none() {
            return Err(Error::invalid_argument(
                "a TLS client CA is for a server with a certificate (it verifies that server's clients)",
            ));
        }
        if self.ca.is_none() && (self.server_name.is_some() || (identity.is_some() && !serves)) {
            return Err(Error::invalid_argument(
                "a client's TLS certificate or server name needs the CA file that makes it connect over TLS",
            ));
        }
        let server = serving
            .map(|(cert, key)| TlsServer::from_files(cert, key, self.client_ca.as_deref()))
            .transpose()?;
        let client = match &self.ca {
            None => None,
            Some(ca) => {
                let client = TlsClient::from_files(ca, identity)?;
                Some(match &self.server_name {
                    Some(name) => client.with_server_name(name.clone()),
                    None => client,
                })
            }
        };
        Ok((server, client))
    }
}

/// One connection's TLS state.
pub(crate) struct Session {
    conn: Connection,
}

impl Session {
    fn new(mut conn: Connection) -> Session {
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Session { conn }
    }

    /// Whether the handshake is still going on.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}

/// A socket's descriptor as rustls's source and sink of records.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv writes only initialised bytes into it.
        let target = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        recv(self.0, target, 0)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_bytes(&self.0, buf)
    }

    /// rustls hands over its queued records together: one `sendmsg`.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        crate::sendv::send_vectored(&self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS failure as an I/O error (`InvalidData`, the rustls error inside).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The rustls error inside an I/O error from a [`Wire`], if it is one: the
/// peer's certificate or handshake was refused, not the network.
pub(crate) fn failure(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What a TLS failure most likely means, for a client's error message.
pub(crate) fn hint(failure: &rustls::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    match failure {
        rustls::Error::InvalidCertificate(_) => {
            " (the server's certificate is not from the CA file's CAs, or not for this host: see tls_server_name)"
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired) => {
            " (the server requires a client certificate: give the client one, with its key)"
        }
        rustls::Error::AlertReceived(Alert::UnknownCA | Alert::BadCertificate) => {
            " (the server does not trust this client's certificate)"
        }
        rustls::Error::InvalidMessage(_) => " (does the server serve TLS?)",
        _ => "",
    }
}

/// Moves bytes over one non-blocking socket: in clear, or through the
/// connection's TLS session. Reads and writes never block; they fail with
/// `WouldBlock` when the socket has nothing for them.
pub(crate) struct Wire<'a> {
    fd: RawFd,
    tls: Option<&'a mut Session>,
}

impl<'a> Wire<'a> {
    /// The wire of `socket`, through `tls` if given.
    pub(crate) fn new(socket: &impl AsRawFd, tls: Option<&'a mut Session>) -> Wire<'a> {
        Wire {
            fd: socket.as_raw_fd(),
            tls,
        }
    }

    /// Sends what the wire takes of `bytes` now: how many it took. Through
    /// TLS, bytes are taken once encrypted, and the records go out as far
    /// as the socket takes them: the rest wait for [`Wire::flush`] (at most
    /// [`BUFFER_LIMIT`] bytes; nothing more is taken until they are out).
    /// A closed peer is an error, never SIGPIPE.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.send_vectored(&[IoSlice::new(bytes)])
    }

    /// [`Wire::send`] for several runs of bytes, in order.
    pub(crate) fn send_vectored(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(session) = self.tls.as_deref_mut() else {
            return crate::sendv::send_vectored(&self.fd, parts);
        };
        flush_records(self.fd, session)?;
        let taken = session.conn.writer().write_vectored(parts)?;
        if taken == 0 && parts.iter().any(|p| !p.is_empty()) {
            // Held by the handshake, whose buffer is full.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match flush_records(self.fd, session) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(taken),
        }
    }

    /// Sends the TLS records waiting for the socket; `WouldBlock` while
    /// some are left.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(session) => flush_records(self.fd, session),
            None => Ok(()),
        }
    }

    /// Whether TLS records wait for the socket (the socket's writability
    /// matters even with nothing else to send).
    pub(crate) fn wants_write(&self) -> bool {
        self.tls.as_deref().is_some_and(|s| s.conn.wants_write())
    }

    /// Reads into `target` what has arrived, until it is full or the
    /// socket has nothing more: how many bytes (0: the peer closed). With
    /// nothing there, `WouldBlock`; so a caller woken by an edge-triggered
    /// poller reads on while `target` comes back full.
    pub(crate) fn recv(&mut self, target: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => recv(self.fd, target, 0),
            Some(session) => recv_tls(self.fd, session, target, 0),
        }
    }

    /// [`Wire::recv`] into initialised memory.
    pub(crate) fn recv_into(&mut self, target: &mut [u8]) -> io::Result<usize> {
        let len = target.len();
        // SAFETY: only initialised bytes are written into it.
        let target = unsafe { &mut *(target as *mut [u8] as *mut [MaybeUninit<u8>]) };
        match self.tls.as_deref_mut() {
            None => recv(self.fd, target, 0),
            Some(session) => recv_tls(self.fd, session, target, len),
        }
    }
}

/// One non-blocking `recv` with `flags` into `target` (0: the peer
/// closed), retried when interrupted; `WouldBlock` when nothing is there.
pub(crate) fn recv(
    fd: RawFd,
    target: &mut [MaybeUninit<u8>],
    flags: libc::c_int,
) -> io::Result<usize> {
    loop {
        // SAFETY: `target` is writable for its length.
        let n = unsafe {
            libc::recv(
                fd,
                target.as_mut_ptr().cast(),
                target.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn flush_records(fd: RawFd, session: &mut Session) -> io::Result<()> {
    while session.conn.wants_write() {
        match session.conn.write_tls(&mut Fd(fd)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads plaintext until `target` is full or the socket has nothing more,
/// feeding rustls records and sending what the handshake answers. The
/// first `initialised` bytes of `target` are; rustls writes only into
/// initialised memory, so the rest is zeroed a record's worth at a time,
/// as it is needed (a large value's buffer is not zeroed ahead of its
/// bytes).
fn recv_tls(
    fd: RawFd,
    session: &mut Session,
    target: &mut [MaybeUninit<u8>],
    mut initialised: usize,
) -> io::Result<usize> {
    const STEP: usize = 16 << 10;
    let mut filled = 0;
    let mut eof = false;
    while filled < target.len() {
        let end = target.len().min(filled.max(initialised) + STEP);
        if initialised < end {
            target[initialised..end].fill(MaybeUninit::new(0));
            initialised = end;
        }
        // SAFETY: target[..initialised] is initialised.
        let ready = unsafe {
            &mut *(&mut target[filled..initialised] as *mut [MaybeUninit<u8>] as *mut [u8])
        };
        match session.conn.reader().read(ready) {
            Ok(0) => return Ok(filled), // close_notify: the end, after what was read
            Ok(n) => {
                filled += n;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The peer closed without close_notify: an end as good as any
            // for this protocol (every message is framed).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(filled),
            Err(e) => return Err(e),
        }
        if eof {
            return Ok(filled);
        }
        match session.conn.read_tls(&mut Fd(fd)) {
            Ok(0) => eof = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && filled > 0 => return Ok(filled),
            Err(e) => return Err(e),
        }
        if let Err(e) = session.conn.process_new_packets() {
            // Tell the peer why (an alert), as far as the socket takes it.
            let _ = flush_records(fd, session);
            return Err(tls_error(e));
        }
        // The handshake answers; a full socket leaves the rest to flush().
        match flush_records(fd, session) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
    }
    Ok(filled)
}
