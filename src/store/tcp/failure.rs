//! A member's failure, as every server of a store tells it: who (rank,
//! host, pid, incarnation), why, and when it was last heard from; shared
//! by the server's sessions (docs/liveness.md) and the records a server on
//! etcd keeps of them (`crate::store::etcd`), so both tell it alike.

use std::time::Duration;

use crate::error::{Error, Status};
use crate::printable::printable;

/// Why a session ended without being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The connection it was opened on was lost.
    ConnectionLost,
    /// Nothing arrived from it within its TTL.
    TtlMissed(Duration),
    /// The process reported this error.
    Reported(String),
    /// A newer incarnation of the same rank opened a session.
    Fenced { by: u64 },
    /// Its etcd lease ran out (a server on etcd): the server that kept it
    /// alive stopped, and the member did not resume its session on another
    /// within the lease's TTL.
    LeaseExpired(Duration),
}

/// A member's failure, as the other members of its group are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The group (a key prefix: the job).
    pub(crate) group: Vec<u8>,
    /// Who failed, as it said when it opened its session.
    pub(crate) rank: u32,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) incarnation: u64,
    /// Why.
    pub(crate) cause: Cause,
    /// How long before the failure it was last heard from (None: not
    /// known where the failure was decided).
    pub(crate) silent_for: Option<Duration>,
}

impl Failure {
    /// The error every blocked and later call of the group's other members
    /// fails with: who, why, and when it was last heard from.
    pub(crate) fn error(&self) -> Error {
        let why = match &self.cause {
            Cause::ConnectionLost => "its connection was lost".to_string(),
            Cause::TtlMissed(ttl) => format!("nothing arrived from it within its TTL of {ttl:?}"),
            Cause::Reported(message) => format!("it reported: {message}"),
            Cause::Fenced { by } => format!("a newer incarnation ({by}) of the rank started"),
            Cause::LeaseExpired(ttl) => format!(
                "its session's etcd lease ran out: its server stopped renewing it, and it did \
                 not resume on another server within the lease's TTL of {ttl:?}"
            ),
        };
        let heard = self
            .silent_for
            .map(|d| format!("; last heard {} ms before", d.as_millis()))
            .unwrap_or_default();
        Error::new(
            Status::PeerFailed,
            format!(
                "rank {} of group '{}' (host {}, pid {}, incarnation {}) failed: {why}{heard}",
                self.rank,
                printable(&self.group),
                self.host,
                self.pid,
                self.incarnation,
            ),
        )
    }

    /// The failure as a record other servers of the same store read
    /// ([`Failure::decode`]): `RANK PID INCARNATION SILENT_MS|- CAUSE ARG`,
    /// then the host, then a reported message, a line each.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (cause, arg, message) = match &self.cause {
            Cause::ConnectionLost => ("lost", 0, ""),
            Cause::TtlMissed(ttl) => ("ttl", ttl.as_millis() as u64, ""),
            Cause::Reported(message) => ("reported", 0, message.as_str()),
            Cause::Fenced { by } => ("fenced", *by, ""),
            Cause::LeaseExpired(ttl) => ("expired", ttl.as_millis() as u64, ""),
        };
        let silent = self
            .silent_for
            .map_or("-".to_string(), |d| d.as_millis().to_string());
        format!(
            "{} {} {} {silent} {cause} {arg}\n{}\n{message}",
            self.rank, self.pid, self.incarnation, self.host
        )
        .into_bytes()
    }

    /// The failure of a member of `group` that `record` holds, if it is one.
    pub(crate) fn decode(group: &[u8], record: &[u8]) -> Option<Failure> {
        let text = std::str::from_utf8(record).ok()?;
        let mut lines = text.splitn(3, '\n');
        let mut fields = lines.next()?.split(' ');
        let mut next = || fields.next();
        let rank = next()?.parse().ok()?;
        let pid = next()?.parse().ok()?;
        let incarnation = next()?.parse().ok()?;
        let silent_for = match next()? {
            "-" => None,
            ms => Some(Duration::from_millis(ms.parse().ok()?)),
        };
        let (kind, arg): (&str, u64) = (next()?, next()?.parse().ok()?);
        let host = lines.next()?.to_string();
        let message = lines.next().unwrap_or_default().to_string();
        let cause = match kind {
            "lost" => Cause::ConnectionLost,
            "ttl" => Cause::TtlMissed(Duration::from_millis(arg)),
            "reported" => Cause::Reported(message),
            "fenced" => Cause::Fenced { by: arg },
            "expired" => Cause::LeaseExpired(Duration::from_millis(arg)),
            _ => return None,
        };
        Some(Failure {
            group: group.to_vec(),
            rank,
            host,
            pid,
            incarnation,
            cause,
            silent_for,
        })
    }
}
