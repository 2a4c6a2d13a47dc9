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
