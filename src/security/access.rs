//! Who may connect to a server: the networks it admits (an allow-list of
//! CIDR blocks), and among them those whose clients need not authenticate
//! nor use TLS (PyTorch's clients can do neither). Socket-free: the event
//! loops ask [`AccessPolicy::admit`] with the peer's address when they
//! accept, and again when a connection turns out to speak TLS.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::security::auth::Secret;
use crate::security::tls::TlsServer;

/// A block of addresses in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or
/// one address (`192.0.2.7`, a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix_len: u8,
}

impl Network {
    /// Whether `ip` is in this network. An IPv4 address a dual-stack
    /// socket reports as IPv6 (`::ffff:10.1.2.3`) is matched as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.address.is_ipv4()
            && Network {
                address: ip,
                ..*self
            }
            .first_address()
                == self.address
    }

    /// Parses a comma-separated list of networks (empty entries and spaces
    /// around them are ignored).
    pub fn parse_list(text: &str) -> Result<Vec<Network>> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect()
    }
}

impl FromStr for Network {
    type Err = Error;

    /// `ADDRESS/PREFIX_LEN` or `ADDRESS`; host bits set under the prefix
    /// are refused (a typo more often than not).
    fn from_str(text: &str) -> Result<Network> {
        let bad = |why: &str| {
            Error::invalid_argument(format!(
                "'{text}' is not a network: {why} (expected CIDR such as 10.0.0.0/8, fd00::/8 or 192.0.2.7)"
            ))
        };
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let address: IpAddr = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad("not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| bad(&format!("the prefix length must be 0 to {max}")))?,
        };
        let network = Network {
            address,
            prefix_len,
        };
        let first = network.first_address();
        if first != address {
            return Err(bad(&format!(
                "host bits are set under the prefix (did you mean {first}/{prefix_len}?)"
            )));
        }
        Ok(network)
    }
}

impl Network {
    /// Its address with the bits under the prefix kept and the rest zero.
    fn first_address(&self) -> IpAddr {
        match self.address {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len));
                IpAddr::V4((u32::from(a) & mask.unwrap_or(0)).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len));
                IpAddr::V6((u128::from(a) & mask.unwrap_or(0)).into())
            }
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// Whom a server lets in, and what they must prove.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Networks clients may connect from; empty: any address. A client
    /// from elsewhere is disconnected as soon as it is accepted, PyTorch's
    /// clients included.
    pub allow: Vec<Network>,
    /// The shared secret clients prove they hold (challenge-response; it
    /// never travels); `None`: no authentication.
    pub secret: Option<Secret>,
    /// With a secret or TLS: networks whose clients may skip
    /// authentication and TLS (PyTorch's clients, which can do neither).
    /// Others must use TLS (if the server serves it) and authenticate (if
    /// it has a secret) before their first request.
    pub allow_unauthenticated: Vec<Network>,
    /// Serve TLS: with it, connections in clear are served only from
    /// `allow_unauthenticated` networks (others may only learn that TLS is
    /// required). `None`: everything in clear, as PyTorch.
    pub tls: Option<TlsServer>,
    /// How long, and how many at once, connections may take to prove
    /// what the policy asks (with a secret or TLS).
    pub handshakes: HandshakeLimits,
}

/// What connections still in their handshake may take of a server with a
/// secret or TLS: until a connection has authenticated (and finished its
/// TLS handshake), it counts against `max_pending` rather than the
/// connection quota, and it is closed if it has not finished within
/// `timeout`. So strangers who connect and stay silent can neither hold
/// the server's connections nor its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Time from accept to the end of the handshake (default 10 s).
    pub timeout: Duration,
    /// Connections in their handshake at once (default 128); one more is
    /// closed as soon as it is accepted.
    pub max_pending: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: Duration::from_secs(10),
            max_pending: 128,
        }
    }
}

/// What a server does with a new connection, by its peer's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not from an allowed network: close it.
    Refused,
    /// Serve it; it may authenticate if it wants to.
    Open,
    /// Serve only the handshake until it authenticates.
    MustAuthenticate,
    /// It is in clear, which this server serves only from exempt networks:
    /// tell it TLS is required, and serve nothing else.
    MustUseTls,
}

impl AccessPolicy {
    /// What to do with a connection from `peer`, in clear or `over_tls`.
    pub fn admit(&self, peer: IpAddr, over_tls: bool) -> Admission {
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(peer)) {
            return Admission::Refused;
        }
        if self.allow_unauthenticated.iter().any(|n| n.contains(peer)) {
            return Admission::Open;
        }
        if self.tls.is_some() && !over_tls {
            return Admission::MustUseTls;
        }
        if self.secret.is_some() {
            return Admission::MustAuthenticate;
        }
        Admission::Open
    }

    /// Refuses a policy that would not do what it says: networks exempt
    /// from authentication and TLS on a server with neither (every client
    /// would be), and handshake limits of zero (no client could connect).
    pub fn check(&self) -> Result<()> {
        if self.handshakes.timeout.is_zero() || self.handshakes.max_pending == 0 {
            return Err(Error::invalid_argument(
                "the handshake timeout (--handshake-timeout) and the number of connections \
                 in their handshake (--max-handshakes) must be above zero",
            ));
        }
        if self.secret.is_none() && self.tls.is_none() && !self.allow_unauthenticated.is_empty() {
            return Err(Error::invalid_argument(
                "networks let in without authentication (allow_unauthenticated, \
                 --allow-unauthenticated) need a secret (--secret-file or --secret-env) \
                 or TLS (--tls-cert): without either, every client is unauthenticated",
            ));
        }
        Ok(())
    }

    /// Whether some connections must prove something (a secret, TLS)
    /// before they are served: the [`HandshakeLimits`] apply.
    pub fn requires_handshake(&self) -> bool {
        self.secret.is_some() || self.tls.is_some()
    }

    /// One line for logs: what the policy lets in.
    pub fn describe(&self) -> String {
        let list = |nets: &[Network]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let from = if self.allow.is_empty() {
            "any address".to_owned()
        } else {
            list(&self.allow)
        };
        let mut line = format!("clients from {from}");
        match &self.tls {
            Some(tls) if tls.verifies_clients() => line += ", over TLS with a client certificate",
            Some(_) => line += ", over TLS",
            None => {}
        }
        line += if self.secret.is_some() {
            ", which must authenticate"
        } else {
            ", without authentication"
        };
        if !self.allow_unauthenticated.is_empty() && (self.secret.is_some() || self.tls.is_some()) {
            line += &format!(
                ", unless from {} (served as PyTorch's clients need: in clear, unauthenticated)",
                list(&self.allow_unauthenticated)
            );
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_v4_mapped_ones_included() {
        let net: Network = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.255.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "a dual-stack peer");
        assert!(!net.contains(ip("::1")));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        let one: Network = "192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert!("[::1]/128".parse::<Network>().unwrap().contains(ip("::1")));
    }

    #[test]
    fn bad_networks_are_refused_with_the_reason() {
        for (text, why) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
            ("10.0.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("example.org/8", "not an IP address"),
            ("10.0.0.0/", "0 to 32"),
        ] {
            let e = text.parse::<Network>().unwrap_err();
            assert_eq!(e.status(), crate::Status::InvalidArgument);
            assert!(e.message().contains(why), "{text}: {}", e.message());
        }
        assert_eq!(
            Network::parse_list(" 10.0.0.0/8, ,::1 ").unwrap().len(),
            2,
            "spaces and empty entries are ignored"
        );
    }

    #[test]
    fn the_policy_refuses_outsiders_and_asks_the_rest_to_authenticate() {
        let open = AccessPolicy::default();
        assert_eq!(open.admit(ip("203.0.113.9"), false), Admission::Open);
        let policy = AccessPolicy {
            allow: Network::parse_list("10.0.0.0/8,127.0.0.1").unwrap(),
            secret: Some(Secret::new(b"s3cret-s3cret".to_vec()).unwrap()),
            allow_unauthenticated: Network::parse_list("10.9.0.0/16").unwrap(),
            ..AccessPolicy::default()
        };
        assert_eq!(policy.admit(ip("192.168.1.1"), false), Admission::Refused);
        assert_eq!(
            policy.admit(ip("10.1.1.1"), false),
            Admission::MustAuthenticate
        );
        assert_eq!(
            policy.admit(ip("::ffff:127.0.0.1"), false),
            Admission::MustAuthenticate
        );
        assert_eq!(policy.admit(ip("10.9.3.4"), false), Admission::Open);
        assert!(!policy.describe().contains("s3cret"));
    }

    #[test]
    fn with_tls_connections_in_clear_are_served_only_from_exempt_networks() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
        let tls =
            TlsServer::from_files(&dir.join("server.pem"), &dir.join("server.key"), None).unwrap();
        let policy = AccessPolicy {
            allow_unauthenticated: Network::parse_list("10.9.0.0/16").unwrap(),
            tls: Some(tls),
            ..AccessPolicy::default()
        };
        policy.check().unwrap();
        assert_eq!(policy.admit(ip("10.1.1.1"), false), Admission::MustUseTls);
        assert_eq!(policy.admit(ip("10.1.1.1"), true), Admission::Open);
        assert_eq!(policy.admit(ip("10.9.1.1"), false), Admission::Open);
        let with_secret = AccessPolicy {
            secret: Some(Secret::new(b"s".to_vec()).unwrap()),
            ..policy
        };
        assert_eq!(
            with_secret.admit(ip("10.1.1.1"), true),
            Admission::MustAuthenticate
        );
        assert_eq!(
            with_secret.admit(ip("10.1.1.1"), false),
            Admission::MustUseTls
        );
        let line = with_secret.describe();
        assert!(
            line.contains("over TLS") && line.contains("unless from 10.9.0.0/16"),
            "{line}"
        );
        let without_either = AccessPolicy {
            allow_unauthenticated: Network::parse_list("10.9.0.0/16").unwrap(),
            ..AccessPolicy::default()
        };
        assert!(without_either.check().is_err());
        let no_time = AccessPolicy {
            handshakes: HandshakeLimits {
                timeout: Duration::ZERO,
                ..HandshakeLimits::default()
            },
            ..AccessPolicy::default()
        };
        assert!(no_time.check().is_err(), "no client could connect");
    }
}
