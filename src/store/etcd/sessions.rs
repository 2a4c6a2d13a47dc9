//! Liveness sessions kept in etcd, for the servers of
//! `distcore serve --backend etcd` (docs/liveness.md, "On etcd"): every
//! server of one store agrees on who is a member and who failed, and a
//! session outlives the server it was opened on for its lease's TTL.
//!
//! Layout under the job's prefix `P` (`G` is the group as `<len>:<group>`,
//! so no group's keys start with another's; `R` the rank in decimal):
//!
//! | etcd key | what |
//! |---|---|
//! | `P/m/G/R` | the member record: its session's etcd lease and spec (no lease of its own: it outlives the session until its end is recorded) |
//! | `P/s/G/R` | the member's liveness key, attached to its lease: etcd deletes it when the lease runs out |
//! | `P/f/G` | the group's first failure, written once |
//! | `P/r/G` | the group is recoverable (`super::recoverable`: its mode, and its membership published) |
//!
//! Every change is a transaction comparing what it was decided on, so a
//! copy applied late (a member that held it, then resumed) does nothing,
//! and whoever comes second (another server deciding the same end) finds
//! the change made:
//! - **open**: the member record and liveness key are created together,
//!   unless the rank has a record (a live incarnation) or the group a
//!   failure while it still has members; the failure of a group with no
//!   member left is deleted then (the job's next run starts clean). A
//!   record of an older incarnation is fenced: the failure is recorded.
//! - **resume** (the same incarnation, from another server): taken over
//!   if its liveness key still exists; the record is written again, so
//!   the server it left can no longer end it.
//! - **close**: both keys deleted, then the lease revoked (its keys go).
//! - **failure** decided by the server holding the session: the group's
//!   failure recorded if it has none, and both keys deleted, in one
//!   transaction; then the lease revoked.
//! - **expiry**: a liveness key gone while its member record stays means
//!   the lease ran out; any server that sees it records the failure
//!   ([`EtcdStore::record_expiry`]), exactly once between them.
//!
//! In a recoverable group nothing records a failure: an end, a fencing or
//! an expiry only deletes the member's keys, and the group's membership
//! is published again (`super::recoverable`).

use std::time::{Duration, Instant};

use super::client::{Compare, Kv, Op, Read, Resend};
use super::EtcdStore;
use crate::error::{Error, Result, Status};
use crate::printable::printable;
use crate::store::tcp::failure::{Cause, Failure};
use crate::store::tcp::protocol::SessionSpec;

/// Member records under the prefix.
pub(super) const MEMBERS: &[u8] = b"/m/";
/// Liveness keys under the prefix.
pub(super) const ALIVE: &[u8] = b"/s/";
/// Failure records under the prefix.
pub(super) const FAILURES: &[u8] = b"/f/";

/// What a member record holds: the session's lease (and the TTL it was
/// granted for) and spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberRecord {
    pub lease: i64,
    pub lease_ttl: Duration,
    pub spec: SessionSpec,
}

impl MemberRecord {
    fn encode(&self) -> Vec<u8> {
        let ttl_ms = self.lease_ttl.as_millis() as u64;
        [
            &self.lease.to_le_bytes()[..],
            &ttl_ms.to_le_bytes(),
            &self.spec.encode(),
        ]
        .concat()
    }

    pub(super) fn decode(value: &[u8]) -> Option<MemberRecord> {
        let (lease, rest) = value.split_first_chunk::<8>()?;
        let (ttl_ms, spec) = rest.split_first_chunk::<8>()?;
        Some(MemberRecord {
            lease: i64::from_le_bytes(*lease),
            lease_ttl: Duration::from_millis(u64::from_le_bytes(*ttl_ms)),
            spec: SessionSpec::decode(spec, usize::MAX)?,
        })
    }
}

/// A session held in etcd, as the server that opened (or resumed) it
/// knows it: what ending it compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldSession {
    pub group: Vec<u8>,
    pub rank: u32,
    pub lease: i64,
    /// The revision its member record was last written at.
    pub revision: i64,
    /// Its group is recoverable: its end records no failure.
    pub recoverable: bool,
}

/// What [`EtcdStore::end_session`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Ended, its failure recorded as its group's first, by this call.
    Recorded,
    /// Ended (closed, or its failure recorded already) by this call.
    Now,
    /// Ended already (an earlier attempt, or another server).
    Already,
    /// Taken over by another server (resumed there): it lives on.
    Elsewhere,
}

/// A change to the session keys, as a watch or a snapshot shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionChange {
    /// A member record written (with its revision), or deleted.
    Member {
        group: Vec<u8>,
        rank: u32,
        record: Option<(MemberRecord, i64)>,
    },
    /// A liveness key written, or deleted (its lease ran out, or the
    /// session ended).
    Alive {
        group: Vec<u8>,
        rank: u32,
        alive: bool,
    },
    /// A group's failure recorded, or forgotten.
    Failure {
        group: Vec<u8>,
        failure: Option<Failure>,
    },
}

/// The error of the failure of a member of `group` that `record` holds
/// (a record that is no failure still fails the group, saying so).
pub(super) fn failure_error(group: &[u8], record: &[u8]) -> Error {
    Failure::decode(group, record).map_or_else(
        || {
            Error::new(
                Status::PeerFailed,
                "the group failed (its record is malformed)",
            )
        },
        |failure| failure.error(),
    )
}

/// `<len>:<group>`.
pub(super) fn group_part(group: &[u8]) -> Vec<u8> {
    [format!("{}:", group.len()).as_bytes(), group].concat()
}

/// The group and the rest of `key` after `<len>:<group>`.
fn split_group(key: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let colon = key.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&key[..colon]).ok()?.parse().ok()?;
    let rest = &key[colon + 1..];
    (rest.len() >= len).then(|| (rest[..len].to_vec(), &rest[len..]))
}

/// The group and rank of `/G/R` after an area's prefix.
fn group_and_rank(key: &[u8]) -> Option<(Vec<u8>, u32)> {
    let (group, rest) = split_group(key)?;
    let rank = std::str::from_utf8(rest.strip_prefix(b"/")?).ok()?;
    Some((group, rank.parse().ok()?))
}

impl EtcdStore {
    pub(super) fn member_key(&self, group: &[u8], rank: u32) -> Vec<u8> {
        let rank = format!("/{rank}");
        [
            &self.prefix[..],
            MEMBERS,
            &group_part(group),
            rank.as_bytes(),
        ]
        .concat()
    }

    pub(super) fn members_prefix(&self, group: &[u8]) -> Vec<u8> {
        [&self.prefix[..], MEMBERS, &group_part(group), b"/"].concat()
    }

    /// The prefix of the liveness keys of `group`'s members (each then
    /// ends with its rank).
    pub(super) fn alive_prefix(&self, group: &[u8]) -> Vec<u8> {
        [&self.prefix[..], ALIVE, &group_part(group), b"/"].concat()
    }

    fn alive_key(&self, group: &[u8], rank: u32) -> Vec<u8> {
        let rank = format!("/{rank}");
        [&self.prefix[..], ALIVE, &group_part(group), rank.as_bytes()].concat()
    }

    pub(super) fn failure_key(&self, group: &[u8]) -> Vec<u8> {
        [&self.prefix[..], FAILURES, &group_part(group)].concat()
    }

    /// The session change an etcd key under the prefix is, if it is one.
    pub(crate) fn session_change(&self, kv: &Kv, deleted: bool) -> Option<SessionChange> {
        let key = kv.key.strip_prefix(&self.prefix[..])?;
        if let Some(rest) = key.strip_prefix(MEMBERS) {
            let (group, rank) = group_and_rank(rest)?;
            let record = match deleted {
                true => None,
                false => Some((MemberRecord::decode(&kv.value)?, kv.mod_revision)),
            };
            return Some(SessionChange::Member {
                group,
                rank,
                record,
            });
        }
        if let Some(rest) = key.strip_prefix(ALIVE) {
            let (group, rank) = group_and_rank(rest)?;
            let alive = !deleted;
            return Some(SessionChange::Alive { group, rank, alive });
        }
        let rest = key.strip_prefix(FAILURES)?;
        let (group, rest) = split_group(rest)?;
        if !rest.is_empty() {
            return None;
        }
        let failure = match deleted {
            true => None,
            false => Some(Failure::decode(&group, &kv.value)?),
        };
        Some(SessionChange::Failure { group, failure })
    }

    /// The reads of every session key, for a snapshot: member records,
    /// liveness keys (without values), failures.
    pub(crate) fn session_reads(&self) -> Vec<Op> {
        let read = |area: &[u8], read| Op::Range {
            key: [&self.prefix[..], area].concat(),
            prefix: true,
            read,
        };
        vec![
            read(MEMBERS, Read::Values),
            read(ALIVE, Read::Keys),
            read(FAILURES, Read::Values),
        ]
    }

    /// Opens a session in etcd for `spec` (`spec.resume`: takes over the
    /// live session of the same incarnation), its lease granted for
    /// `lease_ttl`: refused with the group's failure
    /// ([`Status::PeerFailed`]) while it has one and members, and
    /// [`Status::InvalidState`] when the rank is live with an incarnation
    /// not older (or, to resume, no longer live).
    pub(crate) fn open_member(
        &self,
        spec: &SessionSpec,
        lease_ttl: Duration,
    ) -> Result<HeldSession> {
        // Chosen here, so that granting it again is harmless; it tells this
        // open's record from any other's after an unanswered attempt.
        let lease = fastrand::i64(1..i64::MAX);
        let mut granted = false;
        let opened = self.open_on_lease(spec, lease, lease_ttl, &mut granted);
        // A lease granted for an open that did not take it holds nothing:
        // revoked rather than left to run out (best effort).
        if granted && opened.as_ref().map_or(true, |held| held.lease != lease) {
            if let Err(e) = self.revoke_lease(lease) {
                log::debug!("etcd: revoking an unused session lease: {}", e.message());
            }
        }
        opened
    }

    /// [`EtcdStore::open_member`], granting the lease `lease` (`granted`
    /// says whether it did) if it creates the session.
    fn open_on_lease(
        &self,
        spec: &SessionSpec,
        lease: i64,
        lease_ttl: Duration,
        granted: &mut bool,
    ) -> Result<HeldSession> {
        let deadline = self.deadline(None);
        let (group, rank) = (&spec.group[..], spec.rank);
        let (member_key, alive_key) = (self.member_key(group, rank), self.alive_key(group, rank));
        let failure_key = self.failure_key(group);
        loop {
            let [member, alive, failure, members, mode] = self.read_session(spec, deadline)?;
            let failure = failure.kvs.into_iter().next();
            let mode = self.mode_guard(spec, mode.kvs.first(), members.count)?;
            if let Some(kv) = member.kvs.into_iter().next() {
                let record = MemberRecord::decode(&kv.value).ok_or_else(|| {
                    Error::new(Status::Protocol, "etcd holds a malformed member record")
                })?;
                if record.lease == lease {
                    return Ok(self.held(spec, lease, kv.mod_revision));
                }
                let theirs = record.spec.incarnation;
                if theirs < spec.incarnation {
                    self.fence(spec, &kv, &record, failure.as_ref())?;
                    continue;
                }
                let live = alive.kvs.into_iter().next();
                if theirs > spec.incarnation || !spec.resume {
                    return Err(Error::new(
                        Status::InvalidState,
                        format!(
                            "rank {rank} of group '{}' is live with incarnation {theirs}, not older than {}",
                            printable(group),
                            spec.incarnation
                        ),
                    ));
                }
                let Some(live) = live else {
                    // Its lease ran out: that is the failure to tell.
                    self.record_expiry(&record, kv.mod_revision)?;
                    continue;
                };
                // Taken over: written again, so that the server it left
                // can no longer end it.
                let compares = [
                    Compare::ModRevision {
                        key: member_key.clone(),
                        revision: kv.mod_revision,
                    },
                    Compare::ModRevision {
                        key: alive_key.clone(),
                        revision: live.mod_revision,
                    },
                ];
                let put = Op::Put {
                    key: member_key.clone(),
                    value: kv.value.clone(),
                    lease: 0,
                };
                let done = self
                    .client
                    .txn(&compares, &[put], &[], Resend::Safe, deadline)?;
                if done.succeeded {
                    return Ok(self.held(spec, record.lease, done.revision));
                }
                continue;
            }
            if spec.resume {
                // Ended meanwhile: its failure, if recorded, says how.
                if let Some(failure) = failure.as_ref().and_then(|kv| {
                    Failure::decode(group, &kv.value)
                        .filter(|f| f.rank == rank && f.incarnation == spec.incarnation)
                }) {
                    return Err(failure.error());
                }
                return Err(Error::new(
                    Status::InvalidState,
                    format!(
                        "rank {rank} of group '{}': no live session of incarnation {} to resume",
                        printable(group),
                        spec.incarnation
                    ),
                ));
            }
            let mut compares = vec![Compare::CreateRevision {
                key: member_key.clone(),
                revision: 0,
            }];
            compares.extend(mode.compares);
            let mut ops = mode.ops;
            match &failure {
                Some(kv) if members.count > 0 => return Err(failure_error(group, &kv.value)),
                // Its last members are gone: forgotten, as the job's next
                // run opens.
                Some(kv) => {
                    compares.push(Compare::ModRevision {
                        key: failure_key.clone(),
                        revision: kv.mod_revision,
                    });
                    compares.push(Compare::NoneUnder {
                        prefix: self.members_prefix(group),
                    });
                    ops.push(Op::Delete {
                        key: failure_key.clone(),
                    });
                }
                None => compares.push(Compare::CreateRevision {
                    key: failure_key.clone(),
                    revision: 0,
                }),
            }
            let seconds = lease_ttl.as_secs_f64().ceil().max(1.0) as i64;
            if !*granted {
                self.client.lease_grant(lease, seconds, deadline)?;
                *granted = true;
            }
            let record = MemberRecord {
                lease,
                lease_ttl: Duration::from_secs(seconds as u64),
                spec: SessionSpec {
                    resume: false,
                    ..spec.clone()
                },
            };
            ops.push(Op::Put {
                key: member_key.clone(),
                value: record.encode(),
                lease: 0,
            });
            ops.push(Op::Put {
                key: alive_key.clone(),
                value: spec.incarnation.to_string().into_bytes(),
                lease,
            });
            let done = self
                .client
                .txn(&compares, &ops, &[], Resend::Safe, deadline)?;
            if done.succeeded {
                return Ok(self.held(spec, lease, done.revision));
            }
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!(
                    "etcd: opening the session of rank {rank} of group '{}': others kept changing it",
                    printable(group)
                )));
            }
        }
    }

    fn held(&self, spec: &SessionSpec, lease: i64, revision: i64) -> HeldSession {
        HeldSession {
            group: spec.group.clone(),
            rank: spec.rank,
            lease,
            revision,
            recoverable: spec.recoverable,
        }
    }

    /// Reads, at one revision, the rank's member record and liveness key,
    /// its group's failure, how many members the group has, and its mode
    /// key.
    fn read_session(
        &self,
        spec: &SessionSpec,
        deadline: Instant,
    ) -> Result<[super::client::Range; 5]> {
        let (group, rank) = (&spec.group[..], spec.rank);
        let read = |key: Vec<u8>, prefix, read| Op::Range { key, prefix, read };
        let reads = [
            read(self.member_key(group, rank), false, Read::Values),
            read(self.alive_key(group, rank), false, Read::Keys),
            read(self.failure_key(group), false, Read::Values),
            read(self.members_prefix(group), true, Read::Count),
            self.mode_read(group),
        ];
        let result = self.client.txn(&[], &reads, &[], Resend::Safe, deadline)?;
        result.ranges.try_into().map_err(|_| {
            Error::new(
                Status::Protocol,
                "etcd answered a transaction of five reads with fewer",
            )
        })
    }

    /// Fences the older incarnation in `kv` (its `record`) for `spec`'s:
    /// its failure recorded if the group has none (and is not
    /// recoverable), its keys deleted, its lease revoked.
    fn fence(
        &self,
        spec: &SessionSpec,
        kv: &Kv,
        record: &MemberRecord,
        failure: Option<&Kv>,
    ) -> Result<()> {
        let fenced = Failure {
            group: spec.group.clone(),
            rank: spec.rank,
            host: record.spec.host.clone(),
            pid: record.spec.pid,
            incarnation: record.spec.incarnation,
            cause: Cause::Fenced {
                by: spec.incarnation,
            },
            silent_for: None,
        };
        let held = HeldSession {
            group: spec.group.clone(),
            rank: spec.rank,
            lease: record.lease,
            revision: kv.mod_revision,
            recoverable: record.spec.recoverable,
        };
        let record_failure = failure.is_none();
        self.end_and_revoke(&held, record_failure.then_some(&fenced))
            .map(drop)
    }

    /// [`EtcdStore::end_session`], then the lease revoked (its keys go)
    /// unless the session lives on elsewhere.
    pub(crate) fn end_and_revoke(
        &self,
        held: &HeldSession,
        failure: Option<&Failure>,
    ) -> Result<Ended> {
        let ended = self.end_session(held, failure)?;
        if ended != Ended::Elsewhere {
            self.revoke_lease(held.lease)?;
        }
        Ok(ended)
    }

    /// Ends `held` in etcd, gracefully (`failure` None) or for `failure`
    /// (the group's failure recorded unless it has one, or is
    /// recoverable): its keys deleted. Its lease is the caller's to revoke
    /// next ([`EtcdStore::revoke_lease`]) unless the session lives on
    /// elsewhere; a recoverable group's membership is the caller's to
    /// publish ([`EtcdStore::publish_members`]).
    pub(crate) fn end_session(
        &self,
        held: &HeldSession,
        failure: Option<&Failure>,
    ) -> Result<Ended> {
        let failure = failure.filter(|_| !held.recoverable);
        let member_key = self.member_key(&held.group, held.rank);
        let unchanged = Compare::ModRevision {
            key: member_key.clone(),
            revision: held.revision,
        };
        let alive_key = self.alive_key(&held.group, held.rank);
        let deletes = [&member_key, &alive_key].map(|key| Op::Delete { key: key.clone() });
        if let Some(ended) = self.end_if(&held.group, vec![unchanged], &deletes, failure)? {
            return Ok(ended);
        }
        // Not ended by this call: ended already (an earlier attempt whose
        // answer was lost, or another server), or taken over elsewhere
        // (its record written again, still on the same lease: keep it).
        let deadline = self.deadline(None);
        let now = self
            .client
            .range(&member_key, false, Read::Values, deadline)?;
        let record = now
            .kvs
            .first()
            .and_then(|kv| MemberRecord::decode(&kv.value));
        Ok(
            match record.is_some_and(|record| record.lease == held.lease) {
                true => Ended::Elsewhere,
                false => Ended::Already,
            },
        )
    }

    /// Makes `deletes` if every one of `unchanged` holds, with `failure`
    /// written in the same transaction as `group`'s if it has none:
    /// [`Ended::Recorded`] then, [`Ended::Now`] when it had one (or there
    /// is no failure to write), None when `unchanged` no longer holds.
    fn end_if(
        &self,
        group: &[u8],
        unchanged: Vec<Compare>,
        deletes: &[Op],
        failure: Option<&Failure>,
    ) -> Result<Option<Ended>> {
        let deadline = self.deadline(None);
        let copy = || deletes.iter().map(Op::clone);
        if let Some(failure) = failure {
            let failure_key = self.failure_key(group);
            let mut compares = unchanged.clone();
            compares.push(Compare::CreateRevision {
                key: failure_key.clone(),
                revision: 0,
            });
            let put = Op::Put {
                key: failure_key,
                value: failure.encode(),
                lease: 0,
            };
            let ops: Vec<Op> = std::iter::once(put).chain(copy()).collect();
            let txn = self
                .client
                .txn(&compares, &ops, &[], Resend::Safe, deadline)?;
            if txn.succeeded {
                return Ok(Some(Ended::Recorded));
            }
        }
        let ops: Vec<Op> = copy().collect();
        let txn = self
            .client
            .txn(&unchanged, &ops, &[], Resend::Safe, deadline)?;
        Ok(txn.succeeded.then_some(Ended::Now))
    }

    /// Revokes the lease `lease`: etcd deletes every key on it.
    pub(crate) fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.client.lease_revoke(lease, self.deadline(None))
    }

    /// Records that the session in `record` (its member record at
    /// `revision`) ended because its lease ran out, if its liveness key
    /// is still gone and the record unchanged: the group's failure unless
    /// it has one (or is recoverable), and the record deleted. Any server
    /// may call it; one does it.
    pub(crate) fn record_expiry(&self, record: &MemberRecord, revision: i64) -> Result<()> {
        let (group, rank) = (&record.spec.group[..], record.spec.rank);
        let member_key = self.member_key(group, rank);
        let unchanged = vec![
            Compare::ModRevision {
                key: member_key.clone(),
                revision,
            },
            Compare::CreateRevision {
                key: self.alive_key(group, rank),
                revision: 0,
            },
        ];
        let failure = Failure {
            group: group.to_vec(),
            rank,
            host: record.spec.host.clone(),
            pid: record.spec.pid,
            incarnation: record.spec.incarnation,
            cause: Cause::LeaseExpired(record.lease_ttl),
            silent_for: None,
        };
        let delete = [Op::Delete { key: member_key }];
        let failure = Some(&failure).filter(|_| !record.spec.recoverable);
        self.end_if(group, unchanged, &delete, failure).map(drop)
    }

    /// Renews the leases `leases` within `timeout`, each member given at
    /// most `per_member`; the ones etcd no longer has.
    pub(crate) fn keep_leases_alive(
        &self,
        leases: &[i64],
        timeout: Duration,
        per_member: Duration,
    ) -> Result<Vec<i64>> {
        let deadline = Instant::now() + timeout;
        self.client.lease_keep_alive(leases, deadline, per_member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_name_their_group_and_rank_whatever_the_group_holds() {
        for group in [&b"job/"[..], b"a/1:b/2", b"", b"\xff/"] {
            let key = [&group_part(group)[..], b"/17"].concat();
            assert_eq!(group_and_rank(&key), Some((group.to_vec(), 17)));
        }
        assert_eq!(group_and_rank(b"4:job//x"), None);
        assert_eq!(group_and_rank(b"9:job/"), None);
    }

    #[test]
    fn a_member_record_holds_its_lease_and_spec() {
        let record = MemberRecord {
            lease: 77,
            lease_ttl: Duration::from_secs(2),
            spec: SessionSpec {
                group: b"job/".to_vec(),
                rank: 3,
                world_size: Some(8),
                incarnation: 99,
                ttl: Some(Duration::from_millis(1500)),
                host: "node7".into(),
                pid: 4243,
                recoverable: false,
                resume: false,
            },
        };
        assert_eq!(MemberRecord::decode(&record.encode()), Some(record));
        assert_eq!(MemberRecord::decode(b"short"), None);
    }
}
