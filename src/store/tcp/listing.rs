//! What SESSION_LIST answers (docs/extensions.md, "Sessions"): the live
//! sessions of the groups under a prefix — who, since when silent, waiting
//! on what — and the groups' failures. What `distcore inspect` shows and
//! what a barrier's timeout names the missing ranks from.

use std::time::Duration;

use super::protocol::put_bytes;

/// A cursor over the fields of a byte string (little-endian integers and
/// `u64`-length-prefixed byte strings); `None` once one is cut short.
pub(crate) struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields { bytes, at: 0 }
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let field = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(field)
    }

    /// Whether every byte was read.
    pub(crate) fn is_done(&self) -> bool {
        self.at == self.bytes.len()
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A byte string of at most `max` bytes.
    pub(crate) fn bytes(&mut self, max: usize) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > max {
            return None;
        }
        self.take(len)
    }
}

/// One live session, as SESSION_LIST shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Its group (the job's key prefix).
    pub group: String,
    /// The member's rank.
    pub rank: u32,
    /// The group's size, as the member said.
    pub world_size: Option<u32>,
    /// The member's incarnation.
    pub incarnation: u64,
    /// Its host.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// How long since anything arrived from it.
    pub silent_for: Duration,
    /// The keys its blocked calls wait on (at most
    /// [`SessionListing::MAX_WAITING`], each cut to
    /// [`SessionListing::MAX_KEY_SHOWN`] bytes), as they travel.
    pub waiting_on: Vec<String>,
}

/// A group's failure: the message its members were told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFailure {
    /// The group.
    pub group: String,
    /// The error its members' calls fail with.
    pub message: String,
}

/// SESSION_LIST's answer: a `u32` version (1), a `u32` count of sessions,
/// each (group, rank `u32`, world size `u32` — 0: not given —, incarnation
/// `u64`, pid `u32`, host, silent ms `u64`, a `u32` count of keys waited
/// on and the keys), a `u32` count of failures, each (group, message),
/// then a `u32`: 1 when sessions were left out to keep the answer within
/// the server's value limit. Strings are byte strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionListing {
    /// The live sessions.
    pub sessions: Vec<SessionInfo>,
    /// The groups that failed (and still have a live session).
    pub failures: Vec<GroupFailure>,
    /// Sessions were left out: the answer would have passed the limit.
    pub truncated: bool,
}

impl SessionListing {
    const VERSION: u32 = 1;
    /// Keys shown per session, at most.
    pub const MAX_WAITING: usize = 4;
    /// Bytes shown of a key, at most.
    pub const MAX_KEY_SHOWN: usize = 256;

    /// The byte string SESSION_LIST answers, within `max_len` bytes.
    pub fn encode(&self, max_len: usize) -> Vec<u8> {
        let mut failures = Vec::new();
        put_count(&mut failures, self.failures.len());
        for failure in &self.failures {
            put_bytes(&mut failures, failure.group.as_bytes());
            put_bytes(&mut failures, failure.message.as_bytes());
        }
        let mut sessions = Vec::new();
        let mut shown = 0;
        for session in &self.sessions {
            let mut one = Vec::new();
            put_bytes(&mut one, session.group.as_bytes());
            one.extend_from_slice(&session.rank.to_le_bytes());
            one.extend_from_slice(&session.world_size.unwrap_or(0).to_le_bytes());
            one.extend_from_slice(&session.incarnation.to_le_bytes());
            one.extend_from_slice(&session.pid.to_le_bytes());
            put_bytes(&mut one, session.host.as_bytes());
            let silent_ms = session.silent_for.as_millis().min(u64::MAX as u128) as u64;
            one.extend_from_slice(&silent_ms.to_le_bytes());
            let waiting = &session.waiting_on[..session.waiting_on.len().min(Self::MAX_WAITING)];
            put_count(&mut one, waiting.len());
            for key in waiting {
                let cut = key.len().min(Self::MAX_KEY_SHOWN);
                put_bytes(&mut one, &key.as_bytes()[..cut]);
            }
            // Version, the two counts and the flag: 16 bytes.
            if 16 + sessions.len() + one.len() + failures.len() > max_len {
                break;
            }
            sessions.extend_from_slice(&one);
            shown += 1;
        }
        let mut listing = Self::VERSION.to_le_bytes().to_vec();
        put_count(&mut listing, shown);
        listing.extend_from_slice(&sessions);
        listing.extend_from_slice(&failures);
        let truncated = self.truncated || shown < self.sessions.len();
        listing.extend_from_slice(&u32::from(truncated).to_le_bytes());
        listing
    }

    /// The listing in `bytes`, if it is one.
    pub fn decode(bytes: &[u8]) -> Option<SessionListing> {
        let mut f = Fields::new(bytes);
        if f.u32()? != Self::VERSION {
            return None;
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut listing = SessionListing::default();
        for _ in 0..f.u32()? {
            let group = text(f.bytes(bytes.len())?);
            let rank = f.u32()?;
            let world_size = Some(f.u32()?).filter(|n| *n > 0);
            let incarnation = f.u64()?;
            let pid = f.u32()?;
            let host = text(f.bytes(bytes.len())?);
            let silent_for = Duration::from_millis(f.u64()?);
            let mut waiting_on = Vec::new();
            for _ in 0..f.u32()? {
                waiting_on.push(text(f.bytes(bytes.len())?));
            }
            listing.sessions.push(SessionInfo {
                group,
                rank,
                world_size,
                incarnation,
                host,
                pid,
                silent_for,
                waiting_on,
            });
        }
        for _ in 0..f.u32()? {
            let group = text(f.bytes(bytes.len())?);
            let message = text(f.bytes(bytes.len())?);
            listing.failures.push(GroupFailure { group, message });
        }
        listing.truncated = f.u32()? != 0;
        Some(listing)
    }
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n.min(u32::MAX as usize) as u32).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(rank: u32) -> SessionInfo {
        SessionInfo {
            group: "job/".into(),
            rank,
            world_size: Some(8),
            incarnation: 7,
            host: "node1".into(),
            pid: 100 + rank,
            silent_for: Duration::from_millis(12),
            waiting_on: vec!["/barrier".into()],
        }
    }

    #[test]
    fn a_listing_round_trips_and_stays_within_its_limit() {
        let listing = SessionListing {
            sessions: (0..4).map(session).collect(),
            failures: vec![GroupFailure {
                group: "old/".into(),
                message: "rank 2 failed".into(),
            }],
            truncated: false,
        };
        let bytes = listing.encode(1 << 20);
        assert_eq!(SessionListing::decode(&bytes), Some(listing.clone()));
        let small = listing.encode(200);
        assert!(small.len() <= 200, "{}", small.len());
        let cut = SessionListing::decode(&small).unwrap();
        assert!(cut.truncated && cut.sessions.len() < 4);
        assert_eq!(cut.failures, listing.failures);
        assert_eq!(SessionListing::decode(&bytes[..bytes.len() - 1]), None);
    }
}

/// One member of a recoverable group, as its membership record shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its rank.
    pub rank: u32,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its process id.
    pub pid: u32,
    /// Its host.
    pub host: String,
}

/// A recoverable group's membership at one epoch: the live set every
/// member reads alike. Kept by the server on the key
/// `distcore/members/<N>:<group>` (N: the group's length in bytes, so no
/// group's keys start with another's) as text — `epoch E` then a line per
/// member, `RANK INCARNATION PID HOST`, by rank — and announced by the key
/// `distcore/members/<N>:<group>#<E>` (holding `E`), written once per
/// epoch. Both go when the group has no member left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupMembers {
    /// Counts the membership's changes: 1 for the first member's arrival.
    pub epoch: u64,
    /// The live members, by rank.
    pub members: Vec<Member>,
}

impl GroupMembers {
    /// The key holding `group`'s membership.
    pub fn key(group: &str) -> String {
        format!("distcore/members/{}:{group}", group.len())
    }

    /// The prefix of the keys announcing `group`'s epochs.
    pub fn epochs_prefix(group: &str) -> String {
        format!("{}#", Self::key(group))
    }

    /// The key written when `group`'s membership reaches `epoch`.
    pub fn epoch_key(group: &str, epoch: u64) -> String {
        format!("{}{epoch}", Self::epochs_prefix(group))
    }

    /// The record's text.
    pub fn encode(&self) -> String {
        let mut text = format!("epoch {}\n", self.epoch);
        for m in &self.members {
            // A host has no newline or space in it that could break a line.
            let host: String = m.host.chars().filter(|c| !c.is_whitespace()).collect();
            text.push_str(&format!("{} {} {} {host}\n", m.rank, m.incarnation, m.pid));
        }
        text
    }

    /// The membership in `text`, if it is a record.
    pub fn decode(text: &[u8]) -> Option<GroupMembers> {
        let text = std::str::from_utf8(text).ok()?;
        let mut lines = text.lines();
        let epoch = lines.next()?.strip_prefix("epoch ")?.parse().ok()?;
        let members = lines
            .map(|line| {
                let mut fields = line.splitn(4, ' ');
                Some(Member {
                    rank: fields.next()?.parse().ok()?,
                    incarnation: fields.next()?.parse().ok()?,
                    pid: fields.next()?.parse().ok()?,
                    host: fields.next().unwrap_or_default().to_string(),
                })
            })
            .collect::<Option<Vec<Member>>>()?;
        Some(GroupMembers { epoch, members })
    }
}

#[cfg(test)]
mod members_tests {
    use super::*;

    #[test]
    fn a_membership_record_round_trips() {
        let members = GroupMembers {
            epoch: 3,
            members: vec![
                Member {
                    rank: 0,
                    incarnation: 11,
                    pid: 7,
                    host: "node 1".into(),
                },
                Member {
                    rank: 2,
                    incarnation: 12,
                    pid: 8,
                    host: String::new(),
                },
            ],
        };
        let text = members.encode();
        assert_eq!(text, "epoch 3\n0 11 7 node1\n2 12 8 \n");
        let mut expected = members.clone();
        expected.members[0].host = "node1".into();
        assert_eq!(GroupMembers::decode(text.as_bytes()), Some(expected));
        assert_eq!(GroupMembers::decode(b"epoch x\n"), None);
        assert_eq!(GroupMembers::key("job/"), "distcore/members/4:job/");
        assert_eq!(
            GroupMembers::epoch_key("job/", 4),
            "distcore/members/4:job/#4"
        );
    }
}
