use std::collections::BTreeMap;

use super::*;

fn value(key: &str, v: &str) -> Change {
    Change::Value {
        key: key.into(),
        value: Some(v.as_bytes().into()),
    }
}

fn element(key: &str, id: &str, created: Option<i64>) -> Change {
    Change::Element {
        key: key.into(),
        id: id.into(),
        created,
    }
}

#[test]
fn follows_values_and_queue_elements() {
    let mut m = Mirror::new(Snapshot {
        values: vec![(b"a".to_vec(), b"1".as_slice().into(), 4)],
        elements: vec![
            (b"q".to_vec(), b"1".to_vec(), 2),
            (b"q".to_vec(), b"2".to_vec(), 3),
        ],
        sessions: Vec::new(),
        revision: 5,
    });
    assert_eq!(m.peek(b"q"), Some(Present::Queued));
    let written = m.apply(&[(value("b", "2"), 6)]);
    assert_eq!(
        written,
        [(b"b".to_vec(), Present::Value(b"2".as_slice().into()))]
    );
    m.apply(&[(
        Change::Value {
            key: b"a".to_vec(),
            value: None,
        },
        7,
    )]);
    m.apply(&[(element("q", "1", None), 8), (element("q", "2", None), 8)]);
    assert_eq!(m.revision, 8);
    assert_eq!(m.peek(b"a"), None);
    assert_eq!(m.peek(b"q"), None, "emptied");
    let get = Request::MultiGet {
        keys: vec![b"a".to_vec(), b"b".to_vec()],
    };
    assert_eq!(
        m.read(&get),
        Some(Outcome::Values(vec![None, Some(b"2".as_slice().into())]))
    );
    assert_eq!(m.read(&Request::GetNumKeys), Some(Outcome::Int(1)));
    assert!(!is_read(&Request::Add {
        key: b"a".to_vec(),
        delta: 1
    }));
    let b = Seen {
        value: Some(b"2".as_slice().into()),
        mod_revision: 6,
    };
    assert_eq!(m.seen(b"b"), b, "a write's guess");
    assert_eq!(m.seen(b"a"), Seen::default());
    assert_eq!(m.usage(), Usage { keys: 1, bytes: 2 });
    m.apply(&[(value("b", "2345"), 9)]);
    assert_eq!(m.usage(), Usage { keys: 1, bytes: 5 }, "replaced");
    assert_eq!(m.value_len(b"b"), Some(4));
}

#[test]
fn an_element_written_again_or_reported_twice_is_one_element() {
    let mut m = Mirror::default();
    let put = (element("q", "e", Some(3)), 3);
    assert_eq!(
        m.apply(std::slice::from_ref(&put)).len(),
        1,
        "a new element wakes"
    );
    assert!(m.apply(&[put]).is_empty(), "seen again: nothing new");
    assert!(m.apply(&[(element("q", "e", Some(3)), 4)]).is_empty());
    let len = Request::QueueLen { key: b"q".to_vec() };
    assert_eq!(m.read(&len), Some(Outcome::Int(1)));
    m.apply(&[(element("q", "e", None), 5)]);
    m.apply(&[(element("q", "e", None), 6)]);
    assert_eq!(m.read(&len), Some(Outcome::Int(0)));
    assert_eq!(
        m.read(&Request::Check {
            keys: vec![b"q".to_vec()]
        }),
        Some(Outcome::Ready(false))
    );
}

#[test]
fn a_queue_found_empty_is_empty_until_a_later_element() {
    let mut m = Mirror::new(Snapshot {
        elements: vec![(b"q".to_vec(), b"old".to_vec(), 3)],
        revision: 4,
        ..Snapshot::default()
    });
    // Another server popped it at 9; this one's pop found the queue
    // empty at 10, before the mirror saw the delete.
    m.saw_empty(b"q", 10);
    assert_eq!(
        m.peek(b"q"),
        None,
        "a blocking pop waits instead of spinning"
    );
    assert!(
        m.apply(&[(element("q", "old", Some(3)), 8)]).is_empty(),
        "a late copy"
    );
    m.apply(&[(element("q", "old", None), 9)]);
    let woken = m.apply(&[(element("q", "new", Some(11)), 11)]);
    assert_eq!(woken, [(b"q".to_vec(), Present::Queued)]);
    assert_eq!(m.peek(b"q"), Some(Present::Queued));
}

/// One revision of a made-up etcd history: the changes a transaction made.
type Revision = Vec<Change>;

/// etcd's state: values, and queue elements with their creation revision.
#[derive(Default, Clone, PartialEq, Debug)]
struct State {
    values: BTreeMap<Key, Vec<u8>>,
    elements: BTreeMap<(Key, Vec<u8>), i64>,
}

impl State {
    fn queue_len(&self, key: &[u8]) -> i64 {
        self.elements.keys().filter(|(q, _)| q == key).count() as i64
    }
}

/// A random history of `n` revisions over a few keys, with the histories
/// resent requests made before writes were guarded: an element written
/// again (the same key, no new creation), created again after its pop,
/// deleted values set again; and the state after each revision.
fn history(rng: &mut fastrand::Rng, n: i64) -> (Vec<Revision>, Vec<State>) {
    let mut state = State::default();
    let (mut revisions, mut states) = (Vec::new(), vec![state.clone()]);
    for revision in 1..=n {
        let mut changes: Revision = Vec::new();
        let mut touched = Vec::new();
        for _ in 0..rng.usize(1..=3) {
            let key = vec![b"abqr"[rng.usize(..4)]];
            let id = vec![b"0123"[rng.usize(..4)]];
            let queue = key[0] >= b'q';
            let name = if queue {
                [&key[..], &id].concat()
            } else {
                key.clone()
            };
            if touched.contains(&name) {
                continue; // etcd refuses a key twice in one transaction
            }
            touched.push(name);
            let change = match (queue, rng.bool()) {
                (false, true) => {
                    let v = vec![rng.u8(..)];
                    state.values.insert(key.clone(), v.clone());
                    Change::Value {
                        key,
                        value: Some(v.into()),
                    }
                }
                (false, false) => {
                    if state.values.remove(&key).is_none() {
                        continue; // etcd reports deletes of what exists
                    }
                    Change::Value { key, value: None }
                }
                (true, true) => {
                    let created = *state
                        .elements
                        .entry((key.clone(), id.clone()))
                        .or_insert(revision);
                    element_of(key, id, Some(created))
                }
                (true, false) => {
                    if state.elements.remove(&(key.clone(), id.clone())).is_none() {
                        continue;
                    }
                    element_of(key, id, None)
                }
            };
            changes.push(change);
        }
        revisions.push(changes);
        states.push(state.clone());
    }
    (revisions, states)
}

fn element_of(key: Key, id: Vec<u8>, created: Option<i64>) -> Change {
    Change::Element { key, id, created }
}

fn snapshot_of(state: &State, revision: i64) -> Snapshot {
    Snapshot {
        values: state
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.as_slice().into(), 1))
            .collect(),
        elements: state
            .elements
            .iter()
            .map(|((q, id), created)| (q.clone(), id.clone(), *created))
            .collect(),
        sessions: Vec::new(),
        revision,
    }
}

fn assert_shows(mirror: &Mirror, state: &State, context: &str) {
    for key in [b"a", b"b"] {
        let expected = state.values.get(&key[..]).map(|v| v.as_slice().into());
        let got = mirror.read(&Request::Get { key: key.to_vec() });
        assert_eq!(got, Some(Outcome::Values(vec![expected])), "{context}");
    }
    for key in [b"q", b"r"] {
        let len = Request::QueueLen { key: key.to_vec() };
        let expected = state.queue_len(key);
        assert_eq!(mirror.read(&len), Some(Outcome::Int(expected)), "{context}");
        assert_eq!(mirror.holds_queue(key), expected > 0, "{context}");
    }
}

/// Whatever the history, wherever the snapshot was taken, however often
/// the change stream starts again from an earlier revision (a watch
/// resumed elsewhere repeats changes), whenever a pop reports the queue
/// found empty, and however the revisions are grouped into messages, the
/// mirror shows etcd's state at the revision it has reached.
#[test]
fn the_mirror_shows_etcds_state_under_every_repetition_of_the_stream() {
    let mut rng = fastrand::Rng::with_seed(0x6d69_7272_6f72);
    let n = 7;
    for _ in 0..120 {
        let (revisions, states) = history(&mut rng, n);
        let at = |r: i64| &revisions[r as usize - 1];
        for snapshot in 0..=n {
            // The stream starts at or before the revision after the
            // snapshot; breaks after `stop` and resumes from `resume`.
            for start in 1..=snapshot + 1 {
                for stop in start - 1..=n {
                    for resume in 1..=stop + 1 {
                        let context = format!(
                            "history {revisions:?}: snapshot at {snapshot}, stream from {start}, \
                             again from {resume} after {stop}"
                        );
                        let mut m = Mirror::new(snapshot_of(&states[snapshot as usize], snapshot));
                        let deliveries = (start..=stop).chain(resume..=n);
                        let (mut batch, mut reached, mut known_empty) = (Vec::new(), snapshot, 0);
                        for r in deliveries {
                            batch.extend(at(r).iter().map(|c| (c.clone(), r)));
                            if r != stop && r < n && rng.bool() {
                                continue; // more revisions in one message
                            }
                            m.apply(&std::mem::take(&mut batch));
                            reached = reached.max(r);
                            // A pop on this server found the queue empty.
                            let empty = rng.i64(1..=n);
                            if rng.u8(..4) == 0 && states[empty as usize].queue_len(b"q") == 0 {
                                m.saw_empty(b"q", empty);
                                known_empty = known_empty.max(empty);
                            }
                            if reached >= known_empty {
                                assert_shows(&m, &states[reached as usize], &context);
                            }
                        }
                        m.apply(&batch);
                        assert_shows(&m, &states[n as usize], &context);
                    }
                }
            }
        }
    }
}
