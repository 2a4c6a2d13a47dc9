//! Recoverable groups kept in etcd (docs/liveness.md, "Recoverable groups"
//! and "On etcd"): a member's failure there fails nobody; it ends the
//! member's session and changes the group's membership, which every
//! server of the store publishes alike.
//!
//! Beside the session keys (`super::sessions`), under the job's prefix `P`
//! (`G` the group as `<len>:<group>`):
//!
//! | etcd key | what |
//! |---|---|
//! | `P/r/G` | the group is recoverable: written by the open that starts it, deleted with its membership once it has no member left |
//! | the store's keys `distcore/members/<N>:<group>` and `...#<E>` | its published membership and the announcement of each epoch, as on the memory backend |
//!
//! **Mode.** Every open compares the mode key: a recoverable open creates
//! it if the group has no member (or finds it), a fate-sharing open finds
//! it absent (or deletes one left by a group with no member), in the
//! transaction that creates the member record, so two members of one
//! group never disagree, however their opens interleave. The mode key
//! changes only when a group starts or ends, so opens do not contend on it.
//!
//! **Membership.** The member records are the membership. Publishing reads
//! them and the published record at one revision and, if the record shows
//! another set, writes the set as the next epoch (and its announcement) in
//! a transaction comparing the record: whoever comes second reads again
//! and finds its change covered, so concurrent publishers make few epochs
//! and never two with one number. An open of a recoverable member is
//! answered once a published record holds it; every server publishes
//! again on each change its watch shows of a recoverable group's members
//! (an end, a lease that ran out), so a server's death between a change
//! and its publication loses nothing.

use std::time::Instant;

use super::client::{Compare, Kv, Op, Read, Resend};
use super::sessions::MemberRecord;
use super::EtcdStore;
use crate::error::{Error, Result, Status};
use crate::printable::printable;
use crate::store::tcp::listing::{GroupMembers, Member};
use crate::store::tcp::protocol::SessionSpec;

/// Mode keys under the prefix.
pub(super) const MODES: &[u8] = b"/r/";

/// The value of a mode key.
const RECOVERABLE: &[u8] = b"recoverable";

/// What an open compares, and does, to keep its group's mode.
pub(super) struct ModeGuard {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl EtcdStore {
    /// The mode key of `group`.
    pub(super) fn mode_key(&self, group: &[u8]) -> Vec<u8> {
        [&self.prefix[..], MODES, &super::sessions::group_part(group)].concat()
    }

    /// The etcd key of the store's key holding `group`'s membership.
    fn membership_key(&self, group: &[u8]) -> Vec<u8> {
        let group = String::from_utf8_lossy(group);
        self.value_key(GroupMembers::key(&group).as_bytes())
    }

    /// The etcd key of the store's key announcing `group`'s `epoch`.
    fn epoch_key(&self, group: &[u8], epoch: u64) -> Vec<u8> {
        let group = String::from_utf8_lossy(group);
        self.value_key(GroupMembers::epoch_key(&group, epoch).as_bytes())
    }

    /// The etcd prefix of the keys announcing `group`'s epochs.
    fn epochs_prefix(&self, group: &[u8]) -> Vec<u8> {
        let group = String::from_utf8_lossy(group);
        self.value_key(GroupMembers::epochs_prefix(&group).as_bytes())
    }

    /// The read of `group`'s mode key, for an open's first look.
    pub(super) fn mode_read(&self, group: &[u8]) -> Op {
        Op::Range {
            key: self.mode_key(group),
            prefix: false,
            read: Read::Keys,
        }
    }

    /// What the open of `spec` compares and does so that its group's
    /// members agree on its mode, given the mode key it read (`mode`) and
    /// how many member records the group has: refused with
    /// [`Status::InvalidState`] when the group has members of the other
    /// mode.
    pub(super) fn mode_guard(
        &self,
        spec: &SessionSpec,
        mode: Option<&Kv>,
        members: i64,
    ) -> Result<ModeGuard> {
        let key = self.mode_key(&spec.group);
        let unchanged = |kv: &Kv| Compare::ModRevision {
            key: key.clone(),
            revision: kv.mod_revision,
        };
        let group_empty = Compare::NoneUnder {
            prefix: self.members_prefix(&spec.group),
        };
        let (compares, ops) = match (spec.recoverable, mode) {
            (true, Some(kv)) => (vec![unchanged(kv)], Vec::new()),
            (false, None) => (
                vec![Compare::CreateRevision {
                    key: key.clone(),
                    revision: 0,
                }],
                Vec::new(),
            ),
            (recoverable, _) if members > 0 => {
                return Err(Error::new(
                    Status::InvalidState,
                    format!(
                        "group '{}' is {}: every member must open its session so",
                        printable(&spec.group),
                        match recoverable {
                            true => "fate-sharing (not recoverable)",
                            false => "recoverable",
                        }
                    ),
                ))
            }
            // The group starts recoverable.
            (true, None) => (
                vec![
                    Compare::CreateRevision {
                        key: key.clone(),
                        revision: 0,
                    },
                    group_empty,
                ],
                vec![Op::Put {
                    key: key.clone(),
                    value: RECOVERABLE.to_vec(),
                    lease: 0,
                }],
            ),
            // A recoverable group's mode left without members: the group
            // starts fate-sharing.
            (false, Some(kv)) => (
                vec![unchanged(kv), group_empty],
                vec![Op::Delete { key: key.clone() }],
            ),
        };
        Ok(ModeGuard { compares, ops })
    }

    /// Publishes the membership of recoverable group `group` as its member
    /// records show it (see the module doc), until the published record
    /// shows them — or, with `holding` (a rank and incarnation), until it
    /// holds that member. A group with no member left (or no longer
    /// recoverable) loses its record, its announcements and its mode key.
    /// Returns the revision from which the store shows the record. After a
    /// lost race (another publisher wrote first), an open looks at the
    /// record alone before reading every member again: the winner's
    /// publication usually holds it.
    pub(crate) fn publish_members(&self, group: &[u8], holding: Option<(u32, u64)>) -> Result<i64> {
        let deadline = self.deadline(None);
        let (record_key, mode_key) = (self.membership_key(group), self.mode_key(group));
        let range = |key: &[u8], prefix, read| Op::Range {
            key: key.to_vec(),
            prefix,
            read,
        };
        let reads = [
            range(&self.members_prefix(group), true, Read::Values),
            range(&record_key, false, Read::Values),
            range(&mode_key, false, Read::Keys),
        ];
        let mut raced = false;
        loop {
            if let (true, Some(member)) = (raced, holding) {
                if let Some(revision) = self.published_with(&record_key, member, deadline)? {
                    return Ok(revision);
                }
            }
            let read = self.client.txn(&[], &reads, &[], Resend::Safe, deadline)?;
            let [members, record, mode] = &read.ranges[..] else {
                return Err(Error::new(
                    Status::Protocol,
                    "etcd answered a transaction of three reads with fewer",
                ));
            };
            let record = record.kvs.first();
            let published = record.and_then(|kv| GroupMembers::decode(&kv.value));
            let record_unchanged = Compare::ModRevision {
                key: record_key.clone(),
                revision: record.map_or(0, |kv| kv.mod_revision),
            };
            let mut live: Vec<Member> = members
                .kvs
                .iter()
                .filter_map(|kv| MemberRecord::decode(&kv.value))
                .map(|record| Member {
                    rank: record.spec.rank,
                    incarnation: record.spec.incarnation,
                    pid: record.spec.pid,
                    host: record.spec.host,
                })
                .collect();
            live.sort_by_key(|m| m.rank);
            let (compares, ops) = match (mode.kvs.first(), published) {
                // Not (or no longer) recoverable, nothing published.
                (None, None) => return Ok(read.revision),
                (Some(mode), _) if live.is_empty() => {
                    let compares = vec![
                        record_unchanged,
                        Compare::ModRevision {
                            key: mode_key.clone(),
                            revision: mode.mod_revision,
                        },
                        Compare::NoneUnder {
                            prefix: self.members_prefix(group),
                        },
                    ];
                    (compares, self.forget_members(group, true))
                }
                (None, Some(_)) => {
                    let compares = vec![
                        record_unchanged,
                        Compare::CreateRevision {
                            key: mode_key.clone(),
                            revision: 0,
                        },
                    ];
                    (compares, self.forget_members(group, false))
                }
                (Some(mode), published) => {
                    let covered = published.as_ref().is_some_and(|p| match holding {
                        Some(member) => holds(p, member),
                        // As decoding the record shows them (a host loses
                        // its spaces).
                        None => {
                            let now = GroupMembers {
                                epoch: p.epoch,
                                members: live.clone(),
                            };
                            GroupMembers::decode(now.encode().as_bytes()).as_ref() == Some(p)
                        }
                    });
                    if covered {
                        return Ok(read.revision);
                    }
                    let epoch = published.map_or(1, |p| p.epoch + 1);
                    let next = GroupMembers {
                        epoch,
                        members: live,
                    };
                    let compares = vec![
                        record_unchanged,
                        Compare::ModRevision {
                            key: mode_key.clone(),
                            revision: mode.mod_revision,
                        },
                    ];
                    let ops = vec![
                        Op::Put {
                            key: record_key.clone(),
                            value: next.encode().into_bytes(),
                            lease: 0,
                        },
                        Op::Put {
                            key: self.epoch_key(group, epoch),
                            value: epoch.to_string().into_bytes(),
                            lease: 0,
                        },
                    ];
                    (compares, ops)
                }
            };
            let done = self
                .client
                .txn(&compares, &ops, &[], Resend::Safe, deadline)?;
            if done.succeeded {
                return Ok(done.revision);
            }
            raced = true;
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!(
                    "etcd: publishing the membership of group '{}': others kept changing it",
                    printable(group)
                )));
            }
        }
    }

    /// The revision of a read showing the membership record at
    /// `record_key` holding `member` (rank, incarnation), if it does.
    fn published_with(
        &self,
        record_key: &[u8],
        member: (u32, u64),
        deadline: Instant,
    ) -> Result<Option<i64>> {
        let read = self
            .client
            .range(record_key, false, Read::Values, deadline)?;
        let published = read
            .kvs
            .first()
            .and_then(|kv| GroupMembers::decode(&kv.value));
        let held = published.is_some_and(|p| holds(&p, member));
        Ok(held.then_some(read.revision))
    }

    /// The deletes of `group`'s published membership (and of its mode key
    /// with `mode`).
    fn forget_members(&self, group: &[u8], mode: bool) -> Vec<Op> {
        let mut ops = vec![
            Op::Delete {
                key: self.membership_key(group),
            },
            Op::DeleteUnder {
                prefix: self.epochs_prefix(group),
            },
        ];
        if mode {
            ops.push(Op::Delete {
                key: self.mode_key(group),
            });
        }
        ops
    }
}

/// Whether `published` holds `member` (rank, incarnation).
fn holds(published: &GroupMembers, (rank, incarnation): (u32, u64)) -> bool {
    published
        .members
        .iter()
        .any(|m| m.rank == rank && m.incarnation == incarnation)
}
