//! Who never came to a barrier (docs/liveness.md, "The missing are
//! named"): a member of a session records the barrier it last entered on
//! one key of its own, leased to its session; when a barrier times out,
//! the ranks whose record names it, and the group's live sessions, name
//! every rank that never arrived, telling the live-but-late from those
//! with no session. One key per member, however many barriers it enters.
//!
//! Arrival keys live outside the user's keys (no leading `/`, like
//! PyTorch's `init/`), so `list_keys` does not show them:
//! `distcore/arrived/<N>:<group>/<rank>` (N: the group's length, so no
//! group's keys start with another's), holding the barrier's wire key.

use std::collections::{BTreeMap, BTreeSet};

use crate::printable::printable;
use crate::store::tcp::listing::SessionListing;

/// The prefix of the arrival keys of `group`'s members.
pub(crate) fn arrivals_prefix(group: &str) -> String {
    format!("distcore/arrived/{}:{group}/", group.len())
}

/// The key recording which barrier `rank` of `group` last entered.
pub(crate) fn arrival_key(group: &str, rank: u32) -> String {
    format!("{}{rank}", arrivals_prefix(group))
}

/// The ranks whose arrival keys (`keys`, under `prefix`, holding
/// `values`) name the barrier on `wire_key`.
pub(crate) fn arrived(
    prefix: &str,
    keys: &[Vec<u8>],
    values: &[Vec<u8>],
    wire_key: &str,
) -> BTreeSet<u32> {
    keys.iter()
        .zip(values)
        .filter(|(_, value)| value[..] == *wire_key.as_bytes())
        .filter_map(|(key, _)| key.strip_prefix(prefix.as_bytes()))
        .filter_map(|rank| std::str::from_utf8(rank).ok()?.parse().ok())
        .collect()
}

/// What completes a barrier's timeout error: the ranks below `world_size`
/// not in `arrived`, those with a live session in `group` (late: with what
/// they wait on) apart from those with none (never joined, or gone). None
/// if nobody is missing.
pub(crate) fn describe_missing(
    group: &str,
    world_size: u32,
    arrived: &BTreeSet<u32>,
    listing: &SessionListing,
) -> Option<String> {
    let missing: Vec<u32> = (0..world_size).filter(|r| !arrived.contains(r)).collect();
    if missing.is_empty() {
        return None;
    }
    let live: BTreeMap<u32, &Vec<String>> = listing
        .sessions
        .iter()
        .filter(|s| s.group == group)
        .map(|s| (s.rank, &s.waiting_on))
        .collect();
    let (late, absent): (Vec<u32>, Vec<u32>) = missing.iter().partition(|r| live.contains_key(r));
    let mut parts = Vec::new();
    if !late.is_empty() {
        let doing: Vec<String> = late
            .iter()
            .take(4)
            .map(|rank| match live[rank].first() {
                Some(key) => format!("rank {rank} waiting on '{}'", shown_key(key)),
                None => format!("rank {rank} not blocked here"),
            })
            .collect();
        parts.push(format!(
            "{} live but late ({})",
            ranges(&late),
            doing.join(", ")
        ));
    }
    if !absent.is_empty() {
        parts.push(format!(
            "{} with no session in group '{group}' (never joined, or left)",
            ranges(&absent)
        ));
    }
    Some(format!(
        "{} of {world_size} ranks never arrived ({}): {}",
        missing.len(),
        ranges(&missing),
        parts.join("; ")
    ))
}

/// A key as the user named it (without the `/` of the wire).
fn shown_key(key: &str) -> String {
    printable(key.strip_prefix('/').unwrap_or(key).as_bytes())
}

/// Ranks as compact ranges: `0-7,12`.
pub(crate) fn ranges(ranks: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let start = ranks[i];
        while i + 1 < ranks.len() && ranks[i + 1] == ranks[i] + 1 {
            i += 1;
        }
        out.push(match ranks[i] == start {
            true => start.to_string(),
            false => format!("{start}-{}", ranks[i]),
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::tcp::listing::SessionInfo;

    #[test]
    fn ranks_read_as_compact_ranges() {
        assert_eq!(ranges(&[0, 1, 2, 3, 4, 5, 6, 7, 12]), "0-7,12");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[1, 3, 4]), "1,3-4");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn the_missing_are_named_late_apart_from_absent() {
        let prefix = arrivals_prefix("job/");
        assert_eq!(prefix, "distcore/arrived/4:job//");
        let keys: Vec<Vec<u8>> = [0, 2, 3, 4]
            .iter()
            .map(|r| arrival_key("job/", *r).into_bytes())
            .chain([b"distcore/arrived/x".to_vec()])
            .collect();
        // Rank 4 last entered another barrier.
        let values: Vec<Vec<u8>> = ["/b", "/b", "/b", "/a", "/b"]
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let arrived = arrived(&prefix, &keys, &values, "/b");
        assert_eq!(arrived, BTreeSet::from([0, 2, 3]));
        let session = |rank: u32, waiting: &[&str]| SessionInfo {
            group: "job/".into(),
            rank,
            world_size: Some(8),
            incarnation: 1,
            host: "h".into(),
            pid: 1,
            silent_for: Duration::ZERO,
            waiting_on: waiting.iter().map(|k| k.to_string()).collect(),
        };
        let listing = SessionListing {
            sessions: vec![
                session(0, &["/b"]),
                session(1, &["/step/9"]),
                session(5, &[]),
            ],
            ..SessionListing::default()
        };
        let text = describe_missing("job/", 8, &arrived, &listing).unwrap();
        assert_eq!(
            text,
            "5 of 8 ranks never arrived (1,4-7): 1,5 live but late (rank 1 waiting on \
             'step/9', rank 5 not blocked here); 4,6-7 with no session in group 'job/' \
             (never joined, or left)"
        );
        let everyone: BTreeSet<u32> = (0..8).collect();
        assert_eq!(describe_missing("job/", 8, &everyone, &listing), None);
    }
}
