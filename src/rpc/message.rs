//! Messages between RPC agents: calls, remote calls, and the RRef control
//! messages of PyTorch's protocol, with their binary encoding.

use std::fmt;

use crate::error::{Error, Result, Status};

/// A worker's id: its rank.
pub type WorkerId = u16;

/// PyTorch's `GloballyUniqueId`: the worker that created it and a counter
/// local to that worker. RRef ids and fork ids are both of this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GloballyUniqueId {
    /// The worker that generated the id.
    pub created_on: WorkerId,
    /// A counter on that worker.
    pub local_id: u64,
}

impl fmt::Display for GloballyUniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GloballyUniqueId(created_on={}, local_id={})",
            self.created_on, self.local_id
        )
    }
}

/// An RRef's id.
pub type RRefId = GloballyUniqueId;
/// The id of one fork (one UserRRef) of an RRef.
pub type ForkId = GloballyUniqueId;

/// What travels when an RRef is passed to another worker (PyTorch's
/// `RRefForkData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkData {
    /// The owner of the value.
    pub owner: WorkerId,
    /// The RRef.
    pub rref_id: RRefId,
    /// The fork the receiver will hold.
    pub fork_id: ForkId,
    /// The worker that sent it.
    pub parent: WorkerId,
}

/// A request from one agent to another. `func` names a registered
/// function, `args` are its argument bytes, `rrefs` the RRefs passed along.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Request {
    /// Run a registered function and reply with its result.
    Call {
        func: String,
        args: Vec<u8>,
        rrefs: Vec<ForkData>,
    },
    /// Run a registered function and keep its result in an OwnerRRef
    /// `rref_id`, of which the caller holds fork `fork_id`.
    Remote {
        func: String,
        args: Vec<u8>,
        rrefs: Vec<ForkData>,
        rref_id: RRefId,
        fork_id: ForkId,
    },
    /// Reply with the value of the OwnerRRef `rref_id`.
    Fetch { rref_id: RRefId },
    /// The user holding `fork_id` deleted it (RREF_USER_DELETE).
    UserDelete { rref_id: RRefId, fork_id: ForkId },
    /// A user received `fork_id` from another user (RREF_FORK_REQUEST).
    ForkRequest { rref_id: RRefId, fork_id: ForkId },
    /// The child holding `fork_id` is known to the owner (RREF_CHILD_ACCEPT).
    ChildAccept { fork_id: ForkId },
}

/// The reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Success, with bytes (a result, a value, or nothing).
    Ok(Vec<u8>),
    /// The request failed on the remote worker.
    Err(String),
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
    }
    fn gid(&mut self, id: GloballyUniqueId) {
        self.u16(id.created_on);
        self.u64(id.local_id);
    }
    fn forks(&mut self, forks: &[ForkData]) {
        self.u64(forks.len() as u64);
        for f in forks {
            self.u16(f.owner);
            self.gid(f.rref_id);
            self.gid(f.fork_id);
            self.u16(f.parent);
        }
    }
}

struct Reader<'a>(&'a [u8]);

fn malformed() -> Error {
    Error::new(Status::Protocol, "malformed RPC message")
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(malformed());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| malformed())?,
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| malformed())?,
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = usize::try_from(self.u64()?).map_err(|_| malformed())?;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| malformed())
    }
    fn gid(&mut self) -> Result<GloballyUniqueId> {
        Ok(GloballyUniqueId {
            created_on: self.u16()?,
            local_id: self.u64()?,
        })
    }
    fn forks(&mut self) -> Result<Vec<ForkData>> {
        let n = self.u64()?;
        (0..n)
            .map(|_| {
                Ok(ForkData {
                    owner: self.u16()?,
                    rref_id: self.gid()?,
                    fork_id: self.gid()?,
                    parent: self.u16()?,
                })
            })
            .collect()
    }
    fn done(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(malformed())
        }
    }
}

impl Request {
    /// The encoded request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Request::Call { func, args, rrefs } => {
                w.u8(0);
                w.bytes(func.as_bytes());
                w.bytes(args);
                w.forks(rrefs);
            }
            Request::Remote {
                func,
                args,
                rrefs,
                rref_id,
                fork_id,
            } => {
                w.u8(1);
                w.bytes(func.as_bytes());
                w.bytes(args);
                w.forks(rrefs);
                w.gid(*rref_id);
                w.gid(*fork_id);
            }
            Request::Fetch { rref_id } => {
                w.u8(2);
                w.gid(*rref_id);
            }
            Request::UserDelete { rref_id, fork_id } => {
                w.u8(3);
                w.gid(*rref_id);
                w.gid(*fork_id);
            }
            Request::ForkRequest { rref_id, fork_id } => {
                w.u8(4);
                w.gid(*rref_id);
                w.gid(*fork_id);
            }
            Request::ChildAccept { fork_id } => {
                w.u8(5);
                w.gid(*fork_id);
            }
        }
        w.0
    }

    /// Decodes a request; a malformed one is a [`Status::Protocol`] error.
    pub fn decode(buf: &[u8]) -> Result<Request> {
        let mut r = Reader(buf);
        let request = match r.u8()? {
            0 => Request::Call {
                func: r.string()?,
                args: r.bytes()?,
                rrefs: r.forks()?,
            },
            1 => Request::Remote {
                func: r.string()?,
                args: r.bytes()?,
                rrefs: r.forks()?,
                rref_id: r.gid()?,
                fork_id: r.gid()?,
            },
            2 => Request::Fetch { rref_id: r.gid()? },
            3 => Request::UserDelete {
                rref_id: r.gid()?,
                fork_id: r.gid()?,
            },
            4 => Request::ForkRequest {
                rref_id: r.gid()?,
                fork_id: r.gid()?,
            },
            5 => Request::ChildAccept { fork_id: r.gid()? },
            _ => return Err(malformed()),
        };
        r.done()?;
        Ok(request)
    }
}

impl Response {
    /// The encoded response.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        match self {
            Response::Ok(bytes) => {
                w.u8(0);
                w.bytes(bytes);
            }
            Response::Err(message) => {
                w.u8(1);
                w.bytes(message.as_bytes());
            }
        }
        w.0
    }

    /// Decodes a response.
    pub fn decode(buf: &[u8]) -> Result<Response> {
        let mut r = Reader(buf);
        let response = match r.u8()? {
            0 => Response::Ok(r.bytes()?),
            1 => Response::Err(r.string()?),
            _ => return Err(malformed()),
        };
        r.done()?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let gid = |c, l| GloballyUniqueId {
            created_on: c,
            local_id: l,
        };
        let fork = ForkData {
            owner: 1,
            rref_id: gid(1, 2),
            fork_id: gid(3, 4),
            parent: 3,
        };
        let requests = vec![
            Request::Call {
                func: "f".into(),
                args: vec![1, 2],
                rrefs: vec![fork],
            },
            Request::Remote {
                func: "g".into(),
                args: vec![],
                rrefs: vec![],
                rref_id: gid(0, 1),
                fork_id: gid(0, 1),
            },
            Request::Fetch { rref_id: gid(2, 9) },
            Request::UserDelete {
                rref_id: gid(2, 9),
                fork_id: gid(1, 1),
            },
            Request::ForkRequest {
                rref_id: gid(2, 9),
                fork_id: gid(1, 1),
            },
            Request::ChildAccept { fork_id: gid(1, 1) },
        ];
        for r in requests {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        for r in [Response::Ok(vec![7]), Response::Err("boom".into())] {
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        }
        assert!(Request::decode(&[9]).is_err());
        assert!(Request::decode(&[2, 0]).is_err());
        assert_eq!(
            gid(0, 3).to_string(),
            "GloballyUniqueId(created_on=0, local_id=3)"
        );
    }
}
