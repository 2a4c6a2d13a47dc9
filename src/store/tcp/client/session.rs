//! The client's side of a liveness session (docs/liveness.md): what a
//! handle's connections must do because its process is a member of a
//! group — the session opened on the primary connection, every spare
//! attached to it — and what the handle becomes when the primary carrying
//! it is lost: the server failed the session, so do the handle's calls;
//! unless the server's sessions outlive it (a server on etcd), when the
//! session is resumed on a new connection.

use std::sync::{Arc, Weak};

use super::super::protocol::{Command, Encoder, SessionSpec};
use super::{Conn, Deadline, Shape};
use crate::error::{Error, Result, Status};
use crate::printable::printable;

/// Where a handle's session stands.
#[derive(Debug, Default)]
pub(crate) enum Membership {
    /// No session.
    #[default]
    None,
    /// Open on the primary connection, with this id, group and rank; its
    /// keep-alives (if it has a TTL) run while `alive` lives.
    Open {
        id: u64,
        group: Vec<u8>,
        rank: u32,
        recoverable: bool,
        alive: Arc<()>,
        /// The spec to resume it with when its connection breaks, where the
        /// server's sessions outlive it.
        resumable: Option<SessionSpec>,
    },
    /// Ended with the primary connection it was opened on: the server
    /// failed it, and every call of the handle fails with this until a
    /// new session is opened or the lost one closed.
    Lost(Error),
}

impl Membership {
    /// The error every call fails with, if the session was lost.
    pub(crate) fn check(&self) -> Result<()> {
        match self {
            Membership::Lost(error) => Err(error.clone()),
            _ => Ok(()),
        }
    }

    /// The primary connection carrying the session, to `server`, is gone:
    /// the session is lost (the server ended it and failed the group).
    /// The error of the call that found out, if there was a session.
    pub(crate) fn primary_lost(&mut self, server: &str) -> Result<()> {
        if let Membership::Open { group, .. } = self {
            let error = Error::new(
                Status::PeerFailed,
                format!(
                    "this process's session in group '{}' ended: the TCPStore at {server} closed its \
                     connection or lost it (its TTL passed, a newer incarnation replaced it, or the network \
                     or the server failed), so the server failed it and told the group; close it, or open \
                     a new one (a new incarnation)",
                    printable(group)
                ),
            );
            *self = Membership::Lost(error.clone());
            return Err(error);
        }
        Ok(())
    }

    /// The spec to resume the open session with, if it may be resumed.
    pub(crate) fn resumable(&self) -> Option<SessionSpec> {
        match self {
            Membership::Open { resumable, .. } => resumable.clone(),
            _ => None,
        }
    }

    /// The open session was resumed as session `id` (on a new
    /// connection): what its keep-alives hold on to.
    pub(crate) fn resumed(&mut self, new_id: u64) -> Option<Weak<()>> {
        match self {
            Membership::Open { id, alive, .. } => {
                *id = new_id;
                Some(Arc::downgrade(alive))
            }
            _ => None,
        }
    }

    /// The open session's id.
    pub(crate) fn id(&self) -> Option<u64> {
        match self {
            Membership::Open { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Whether the open session's group is recoverable.
    pub(crate) fn recoverable(&self) -> bool {
        matches!(
            self,
            Membership::Open {
                recoverable: true,
                ..
            }
        )
    }

    /// The open session's group and rank.
    pub(crate) fn member(&self) -> Option<(String, u32)> {
        match self {
            Membership::Open { group, rank, .. } => {
                Some((String::from_utf8_lossy(group).into_owned(), *rank))
            }
            _ => None,
        }
    }
}

/// Attaches spare connection `conn` to session `id` unless it is already
/// (a spare attached to an earlier session was detached when it ended).
pub(crate) fn attach(conn: &mut Conn, id: Option<u64>, deadline: Deadline) -> Result<()> {
    let Some(id) = id.filter(|id| conn.attached != Some(*id)) else {
        return Ok(());
    };
    let request = Encoder::request(Command::SessionAttach).u64(id).finish();
    conn.call(&[&request], Shape::Ack, deadline)?;
    conn.attached = Some(id);
    Ok(())
}

/// Opens a session of `spec` on `primary`: its id.
pub(crate) fn open(primary: &mut Conn, spec: &SessionSpec, deadline: Deadline) -> Result<u64> {
    let request = Encoder::request(Command::SessionOpen)
        .bytes(&spec.encode())
        .finish();
    let id = primary.call(&[&request], Shape::I64, deadline)?.i64(0)?;
    Ok(id as u64)
}

/// Ends the session of `primary`: gracefully, or with the process's own
/// error `report` (which fails the group, naming this member).
pub(crate) fn end(primary: &mut Conn, report: Option<&str>, deadline: Deadline) -> Result<()> {
    let request = match report {
        None => Encoder::request(Command::SessionClose).finish(),
        Some(message) => Encoder::request(Command::SessionReport)
            .bytes(message.as_bytes())
            .finish(),
    };
    primary.call(&[&request], Shape::Ack, deadline).map(drop)
}
