//! The FileStore log format (spec: FileStore section): records of
//! `u32 LE length + key`, `u32 LE length + value`, appended in order; a
//! key starting with `-` deletes the key after it.

use std::collections::{HashMap, VecDeque};

/// The record key counting the handles that use the file.
pub(crate) const REFCOUNT_KEY: &[u8] = b"refcount/";
/// The record key counting the handles that have closed.
pub(crate) const CLEANUP_KEY: &[u8] = b"cleanup/";
/// Prefix of user keys.
pub(crate) const USER_PREFIX: &[u8] = b"/";
/// Prefix of delete records.
pub(crate) const DELETE_PREFIX: &[u8] = b"-";
/// distcore queue records. They start with the delete prefix, so a PyTorch
/// process replaying the log erases a key that never exists and sees
/// nothing: its key count and values are untouched.
pub(crate) const QUEUE_PUSH_PREFIX: &[u8] = b"-queue+";
pub(crate) const QUEUE_POP_PREFIX: &[u8] = b"-queue-";

/// Encodes one record.
pub(crate) fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len() + value.len());
    for field in [key, value] {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// What replaying the log has built: values by key (as stored, with their
/// prefix) and queues by user key.
#[derive(Default)]
pub(crate) struct Replay {
    pub(crate) values: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
}

/// The outcome of parsing a chunk of log.
pub(crate) struct Parsed {
    /// Bytes of complete records.
    pub(crate) consumed: usize,
    /// Bytes after them that do not make a whole record (a writer died
    /// mid-append, or is still appending without the lock).
    pub(crate) incomplete_tail: bool,
}

fn field(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let len_bytes = buf.get(pos..pos.checked_add(4)?)?;
    let len = u32::from_le_bytes(len_bytes.try_into().ok()?) as usize;
    let start = pos + 4;
    let end = start.checked_add(len)?;
    Some((buf.get(start..end)?, end))
}

impl Replay {
    /// Applies every complete record of `buf`.
    pub(crate) fn apply(&mut self, buf: &[u8]) -> Parsed {
        let mut pos = 0;
        while let Some((key, after_key)) = field(buf, pos) {
            let Some((value, end)) = field(buf, after_key) else {
                break;
            };
            self.apply_record(key, value);
            pos = end;
        }
        Parsed {
            consumed: pos,
            incomplete_tail: pos < buf.len(),
        }
    }

    fn apply_record(&mut self, key: &[u8], value: &[u8]) {
        if let Some(queue) = key.strip_prefix(QUEUE_PUSH_PREFIX) {
            self.queues
                .entry(queue.to_vec())
                .or_default()
                .push_back(value.to_vec());
        } else if let Some(queue) = key.strip_prefix(QUEUE_POP_PREFIX) {
            if let Some(q) = self.queues.get_mut(queue) {
                q.pop_front();
                if q.is_empty() {
                    self.queues.remove(queue);
                }
            }
        } else if let Some(deleted) = key.strip_prefix(DELETE_PREFIX) {
            self.values.remove(deleted);
        } else {
            self.values.insert(key.to_vec(), value.to_vec());
        }
    }
}

/// Whether `buf` (a whole file) looks like a FileStore log: empty, or
/// starting with the refcount record every FileStore writes first.
pub(crate) fn looks_like_a_log(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    match field(buf, 0) {
        Some((key, _)) => key == REFCOUNT_KEY,
        // Too short to tell: only a prefix of "refcount/" is plausible.
        None => buf.len() < 4 || (buf[..4] == [9, 0, 0, 0] && REFCOUNT_KEY.starts_with(&buf[4..])),
    }
}

/// The log of the spec's FileStore example: `set(key,val); add(cnt,3);
/// add(cnt,2); delete_key(key); append(ap,x); append(ap,y)`.
#[cfg(test)]
pub(crate) fn spec_example() -> Vec<u8> {
    [
        (&b"refcount/"[..], &b"1"[..]),
        (b"/key", b"val"),
        (b"/cnt", b"3"),
        (b"/cnt", b"5"),
        (b"-/key", b""),
        (b"/ap", b"x"),
        (b"/ap", b"xy"),
    ]
    .iter()
    .flat_map(|(k, v)| record(k, v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_the_spec_example() {
        let log = spec_example();
        assert!(looks_like_a_log(&log));
        let mut r = Replay::default();
        let parsed = r.apply(&log);
        assert_eq!(
            (parsed.consumed, parsed.incomplete_tail),
            (log.len(), false)
        );
        assert_eq!(r.values.get(&b"/cnt"[..]).unwrap(), b"5");
        assert!(!r.values.contains_key(&b"/key"[..]));
        assert_eq!(r.values.len(), 3);
    }

    #[test]
    fn stops_before_a_truncated_record() {
        let mut log = record(b"refcount/", b"1");
        let whole = log.len();
        log.extend(&record(b"/k", b"value")[..7]);
        let mut r = Replay::default();
        let parsed = r.apply(&log);
        assert_eq!((parsed.consumed, parsed.incomplete_tail), (whole, true));
    }

    #[test]
    fn queue_records_are_deletes_to_pytorch() {
        let mut r = Replay::default();
        let mut log = record(b"-queue+/q", b"1");
        log.extend(record(b"-queue+/q", b"2"));
        log.extend(record(b"-queue-/q", b""));
        r.apply(&log);
        assert_eq!(r.queues[&b"/q"[..]], [b"2".to_vec()]);
        assert!(r.values.is_empty());
        assert!(QUEUE_PUSH_PREFIX.starts_with(DELETE_PREFIX));
    }

    #[test]
    fn rejects_files_that_are_not_logs() {
        assert!(!looks_like_a_log(b"#!/bin/sh\necho hello\n"));
        assert!(!looks_like_a_log(&record(b"/k", b"v")));
        assert!(looks_like_a_log(&[9, 0, 0, 0, b'r', b'e']));
    }
}
