//! Writes that etcd applies exactly once and in order, whatever is resent.
//!
//! A request whose answer is lost (a member killed, paused or cut off, a
//! leader change) must be sent again, but the first copy may still be
//! applied later: a member paused with it forwards it to the leader when it
//! resumes, after the caller has moved on. So every write carries, in the
//! same transaction, comparisons that fail once anything it covers has
//! changed since it was decided:
//!
//! - each key it writes must still be at the revision it was seen at (0:
//!   missing). A copy applied late finds the key moved by whatever came
//!   after, its own resend included, and does nothing;
//! - a key seen missing may have existed and been deleted since, which
//!   brings its revision back to 0: every deletion also moves a *clock*
//!   (one for the job's values, one per queue for its elements), and a
//!   write that creates a key compares the clock too.
//!
//! Telling "my earlier copy was applied" from "someone else wrote first"
//! after a failed comparison takes a commit token, written with the change
//! and read back in the failure branch ([`EtcdStore::commit`]).
//!
//! The revisions a write expects are guesses: the front-end's mirror, or
//! what this handle last saw ([`Remembered`]); a wrong guess costs one more
//! request (the failed transaction reads the keys back), never a wrong
//! answer: an answer without a write is never given from a guess.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

use super::client::{Compare, Kv, Op, Read, Resend};
use super::{element_id, EtcdStore, Seen, MAX_CLEANUP_OPS, MAX_TXN_OPS};
use crate::error::{Error, Result};

/// Keys one guarded transaction writes, at most: with its token, its
/// clock and the stale tokens it deletes, within etcd's `--max-txn-ops`.
pub(super) const MAX_KEYS_PER_WRITE: usize = MAX_TXN_OPS - MAX_CLEANUP_OPS - 3;

/// Revisions remembered per handle, at most (then forgotten at once: a
/// forgotten revision costs one more request, no more).
const MAX_REMEMBERED: usize = 4096;

/// What a guarded write does to one of its keys.
pub(super) enum Write {
    Put(Vec<u8>),
    Delete,
}

/// The keys of a guarded write and the clock their deletions move.
pub(super) struct Target {
    /// The etcd keys it may write.
    pub keys: Vec<Vec<u8>>,
    /// The key every deletion among `keys` moves (see the module doc).
    pub clock: Vec<u8>,
    /// Whether the change needs the keys' values (a read-modify-write),
    /// or only whether they exist and since when (a blind write).
    pub values: bool,
    /// The etcd lease the keys it puts are attached to (0: none).
    pub lease: i64,
}

/// Whether [`EtcdStore::commit`] ran its change.
pub(super) enum Committed {
    /// It did, at this revision.
    Yes(i64),
    /// It did not; what each key read back holds now (None: missing).
    No(Vec<Option<Kv>>),
}

/// The revisions a handle last saw its value keys and clocks change at
/// (0: missing): the guesses of its blind writes.
#[derive(Default)]
pub(super) struct Remembered(Mutex<HashMap<Vec<u8>, i64>>);

impl Remembered {
    fn get(&self, key: &[u8]) -> i64 {
        self.0.lock().get(key).copied().unwrap_or(0)
    }

    /// Remembers that `key` was at `revision`; `newer_only`: unless a later
    /// revision is already known (a change stream may lag a commit).
    pub(super) fn set(&self, key: &[u8], revision: i64, newer_only: bool) {
        let mut map = self.0.lock();
        if map.len() >= MAX_REMEMBERED && !map.contains_key(key) {
            map.clear();
        }
        let known = map.entry(key.to_vec()).or_default();
        if !newer_only || revision > *known {
            *known = revision;
        }
    }
}

impl EtcdStore {
    /// Applies `change` to `target`'s keys exactly once, guarded as the
    /// module doc says, retrying with the keys read back until no other
    /// writer interferes or `deadline`. `change` is handed what each key
    /// holds (values only if `target.values`) and says what to write to
    /// each (None: leave it) and what to answer. `guess`: what the keys are
    /// believed to hold (the front-end's mirror); without one, a blind
    /// write guesses from what this handle remembers and a
    /// read-modify-write reads first. Returns the answer and the revision
    /// of the write (0: nothing written).
    pub(super) fn guarded_write<T>(
        &self,
        target: &Target,
        guess: Option<Vec<Seen>>,
        deadline: Instant,
        mut change: impl FnMut(&[Seen]) -> Result<(Vec<Option<Write>>, T)>,
    ) -> Result<(T, i64)> {
        let remembered = || {
            let seen = target.keys.iter().map(|key| Seen {
                value: None,
                mod_revision: self.remembered.get(key),
            });
            seen.collect()
        };
        let mut next = guess.or_else(|| (!target.values).then(remembered));
        let mut guessed = next.is_some();
        loop {
            let seen = match next.take() {
                Some(seen) => seen,
                None => {
                    guessed = false;
                    self.read_seen(target, deadline)?
                }
            };
            let decided = change(&seen);
            let writes_something =
                matches!(&decided, Ok((writes, _)) if writes.iter().any(Option::is_some));
            if guessed && !writes_something {
                continue; // read the keys, then decide
            }
            let (writes, answer) = decided?;
            if !writes_something {
                return Ok((answer, 0));
            }
            let (compares, ops) = self.guarded_ops(target, &seen, writes);
            let effects: Vec<(Vec<u8>, bool)> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Put { key, .. } => Some((key.clone(), false)),
                    Op::Delete { key } => Some((key.clone(), true)),
                    Op::Range { .. } | Op::DeleteUnder { .. } => None,
                })
                .collect();
            let read_back = self.read_back_ops(target);
            match self.commit(compares, ops, read_back, deadline)? {
                Committed::Yes(revision) => {
                    for (key, deleted) in effects {
                        self.remember(&key, if deleted { 0 } else { revision });
                    }
                    return Ok((answer, revision));
                }
                Committed::No(now) => {
                    guessed = false;
                    next = Some(self.seen_of(target, now));
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!(
                    "etcd: gave up writing {}: other writers kept changing it",
                    String::from_utf8_lossy(&target.keys[0])
                )));
            }
        }
    }

    /// The comparisons and operations of a write of `writes` to keys seen
    /// as `seen`.
    fn guarded_ops(
        &self,
        target: &Target,
        seen: &[Seen],
        writes: Vec<Option<Write>>,
    ) -> (Vec<Compare>, Vec<Op>) {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let (mut creates, mut deletes) = (false, false);
        for ((key, seen), write) in target.keys.iter().zip(seen).zip(writes) {
            let Some(write) = write else { continue };
            compares.push(Compare::ModRevision {
                key: key.clone(),
                revision: seen.mod_revision,
            });
            creates |= seen.mod_revision == 0;
            ops.push(match write {
                Write::Put(value) => Op::Put {
                    key: key.clone(),
                    value,
                    lease: target.lease,
                },
                Write::Delete => {
                    deletes = true;
                    Op::Delete { key: key.clone() }
                }
            });
        }
        if creates {
            compares.push(Compare::ModRevision {
                key: target.clock.clone(),
                revision: self.remembered.get(&target.clock),
            });
        }
        if deletes {
            ops.push(Op::Put {
                key: target.clock.clone(),
                value: Vec::new(),
                lease: 0,
            });
        }
        (compares, ops)
    }

    /// Reads of `target`'s keys, then of its clock.
    fn read_back_ops(&self, target: &Target) -> Vec<Op> {
        let read = match target.values {
            true => Read::Values,
            false => Read::Keys,
        };
        let keys = target.keys.iter().map(|key| (key, read));
        keys.chain([(&target.clock, Read::Keys)])
            .map(|(key, read)| Op::Range {
                key: key.clone(),
                prefix: false,
                read,
            })
            .collect()
    }

    /// What `target`'s keys hold now (one read of them all and the clock).
    fn read_seen(&self, target: &Target, deadline: Instant) -> Result<Vec<Seen>> {
        let ops = self.read_back_ops(target);
        let result = self.client.txn(&[], &ops, &[], Resend::Safe, deadline)?;
        let now = result
            .ranges
            .into_iter()
            .map(|range| range.kvs.into_iter().next())
            .collect();
        Ok(self.seen_of(target, now))
    }

    /// The keys' state from what was read back (keys, then the clock),
    /// remembered for the next guesses.
    fn seen_of(&self, target: &Target, mut now: Vec<Option<Kv>>) -> Vec<Seen> {
        now.resize(target.keys.len() + 1, None);
        let clock = now.pop().flatten();
        self.remember(&target.clock, clock.map_or(0, |kv| kv.mod_revision));
        target
            .keys
            .iter()
            .zip(now)
            .map(|(key, kv)| {
                let seen = Seen::of(kv);
                self.remember(key, seen.mod_revision);
                seen
            })
            .collect()
    }

    /// Remembers `key`'s revision if it is a value or a clock (queue
    /// elements are written once: nothing to guess).
    pub(super) fn remember(&self, key: &[u8], revision: i64) {
        if self.is_remembered(key) {
            self.remembered.set(key, revision, false);
        }
    }

    fn is_remembered(&self, key: &[u8]) -> bool {
        key.strip_prefix(&self.prefix[..])
            .is_some_and(|rest| rest.starts_with(super::VALUES) || rest.starts_with(super::CLOCKS))
    }

    /// Runs `ops` if every comparison holds, exactly once: returns whether
    /// they ran, with the revision they ran at, or else what each key of
    /// `read_back` (ranges of one key) holds now.
    ///
    /// A request whose answer was lost is sent again, and its comparisons
    /// then fail if the first went through: telling the two apart takes a
    /// token written with `ops` and read back when the comparisons fail.
    /// Tokens are deleted by the handle's next transaction (no request of
    /// their own), the last ones when the handle goes.
    pub(super) fn commit(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
        read_back: Vec<Op>,
        deadline: Instant,
    ) -> Result<Committed> {
        let token = [&self.prefix[..], super::TOKENS, &element_id()].concat();
        let stale = {
            let mut tokens = self.stale_tokens.lock();
            let keep = tokens.len().saturating_sub(MAX_CLEANUP_OPS);
            tokens.split_off(keep)
        };
        let cleanup = || stale.iter().map(|key| Op::Delete { key: key.clone() });
        let put_token = Op::Put {
            key: token.clone(),
            value: Vec::new(),
            lease: 0,
        };
        let success: Vec<Op> = ops
            .into_iter()
            .chain([put_token])
            .chain(cleanup())
            .collect();
        // The token read back with its revision: the commit's, if an
        // earlier attempt's answer was lost.
        let read_token = Op::Range {
            key: token.clone(),
            prefix: false,
            read: Read::Keys,
        };
        let failure: Vec<Op> = [read_token]
            .into_iter()
            .chain(read_back)
            .chain(cleanup())
            .collect();
        let result = self
            .client
            .txn(&compares, &success, &failure, Resend::Safe, deadline);
        let mut stale_tokens = self.stale_tokens.lock();
        match result {
            Ok(result) => {
                let mut ranges = result.ranges.into_iter();
                // Committed by this attempt (at this revision), or by an
                // earlier one (at its token's revision: the one a read of
                // this job's keys will see, which etcd's current revision,
                // moved by other jobs' writes, may never be).
                let revision = match ranges.next().and_then(|r| r.kvs.into_iter().next()) {
                    _ if result.succeeded => Some(result.revision),
                    Some(token) => Some(token.mod_revision),
                    None => None,
                };
                let Some(revision) = revision else {
                    let now = ranges.map(|r| r.kvs.into_iter().next()).collect();
                    return Ok(Committed::No(now));
                };
                stale_tokens.push(token);
                Ok(Committed::Yes(revision))
            }
            // Nothing may have been applied, or everything: keep them all.
            Err(e) => {
                stale_tokens.extend(stale);
                stale_tokens.push(token);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_revisions_follow_commits_and_streams_and_stay_bounded() {
        let r = Remembered::default();
        r.set(b"k", 7, false);
        r.set(b"k", 5, true);
        assert_eq!(r.get(b"k"), 7, "a lagging stream does not go back");
        r.set(b"k", 0, false);
        assert_eq!(r.get(b"k"), 0, "a commit's delete does");
        for i in 0..MAX_REMEMBERED + 1 {
            r.set(format!("k{i}").as_bytes(), 1, false);
        }
        assert!(r.0.lock().len() <= MAX_REMEMBERED);
    }
}
