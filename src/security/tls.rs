//! TLS (rustls, with ring's cryptography) between distcore peers: a
//! TCPStore's clients and server, and RPC workers.
//!
//! [`TlsServer`] and [`TlsClient`] are read once from PEM files (a
//! certificate chain, its private key, and the CA certificates that vouch
//! for the other side) and shared by every connection; each makes the
//! [`Session`] of one connection, which [`crate::net::wire`] moves bytes
//! through.
//!
//! TLS 1.3 and 1.2 with rustls's safe defaults; no session resumption
//! across processes.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::error::{Error, Result};
use crate::net::wire::Session;

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
