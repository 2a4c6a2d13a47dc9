//! Backends that complete requests later and report writes (a remote store such as etcd).

use super::*;

/// A backend that completes SETs later, as a remote store would.
pub(super) struct Deferring {
    inner: MemoryBackend,
    pub(super) deferred: Vec<(ConnId, Ticket, Request)>,
}

impl Backend for Deferring {
    fn apply(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
    ) -> OpResult<Option<Outcome>> {
        if let Request::Set { .. } = request {
            self.deferred.push((conn, ticket, request.clone()));
            return Ok(None);
        }
        self.inner.apply(conn, ticket, request)
    }
    fn holds_leased_keys(&self) -> bool {
        self.inner.holds_leased_keys()
    }
    fn delete_leased(&mut self, keys: Vec<Key>) {
        self.inner.delete_leased(keys)
    }
    fn peek(&self, key: &[u8]) -> Option<Present> {
        self.inner.peek(key)
    }
    fn look(&mut self, _: WaitId, _: Vec<Key>) {}
    fn take_reports(&mut self) -> Vec<Report> {
        self.deferred
            .drain(..)
            .map(|(conn, ticket, request)| Report::Completed {
                conn,
                ticket,
                outcome: self.inner.apply(conn, ticket, &request).map(|o| o.unwrap()),
            })
            .collect()
    }
    fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.inner.value_len(key)
    }

    fn holds_queue(&self, key: &[u8]) -> bool {
        self.inner.holds_queue(key)
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}

pub(super) fn deferring_core() -> ServerCore<Deferring> {
    let backend = Deferring {
        inner: MemoryBackend::new(VALUE_LIMIT),
        deferred: Vec::new(),
    };
    ServerCore::new(backend, limits(), true, Instant::now())
}

#[test]
fn a_late_answer_for_a_closed_connection_never_reaches_its_successor() {
    let mut c = deferring_core();
    open(&mut c, 0);
    send(&mut c, 0, &set("/old", b"v"));
    let (conn, ticket, request) = c.backend.deferred.pop().unwrap();
    c.disconnect(0);
    open(&mut c, 0);
    send(&mut c, 0, &set("/new", b"w"));
    assert!(!c.wants_input(0), "the new connection's SET is in flight");
    let late = c.backend.inner.apply(conn, ticket, &request);
    c.complete(conn, ticket, late.map(|o| o.unwrap())).unwrap();
    assert!(!c.wants_input(0), "still waiting for its own answer");
    assert!(c.take_backend_reports().is_empty());
    assert!(c.wants_input(0));
}

#[test]
fn a_request_completed_later_holds_back_only_its_own_connection() {
    let backend = Deferring {
        inner: MemoryBackend::new(VALUE_LIMIT),
        deferred: Vec::new(),
    };
    let mut c = ServerCore::new(backend, limits(), true, Instant::now());
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 1, &wait(&["/k"]));
    let mut pipelined = set("/k", b"v");
    pipelined.extend(get("/k"));
    send(&mut c, 0, &pipelined);
    assert!(!c.wants_input(0), "paused while its SET is in flight");
    assert!(
        replies(&mut c, 0).is_empty(),
        "the GET waits behind the SET"
    );
    send(&mut c, 1, &Encoder::request(Command::Ping).u32(1).finish());
    assert_eq!(replies(&mut c, 1), 1u32.to_le_bytes(), "others go on");
    assert!(c.take_backend_reports().is_empty(), "nothing refused");
    assert_eq!(
        replies(&mut c, 1),
        [STOP_WAITING],
        "the write woke the waiter"
    );
    assert_eq!(replies(&mut c, 0), byte_string(b"v"), "then the GET ran");
    assert!(c.wants_input(0));
}

/// A remote backend the test drives: every request completes later, the
/// keys it knows are what the test put in `known`, and the test writes the
/// reports.
#[derive(Default)]
struct Scripted {
    known: std::collections::HashMap<Key, Present>,
    /// Its view lags the writes it acknowledged: waits start when told.
    lagging: bool,
    applied: Vec<(ConnId, Ticket, Request)>,
    looks: Vec<(WaitId, Vec<Key>)>,
    reports: Vec<Report>,
}

impl Backend for Scripted {
    fn apply(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
    ) -> OpResult<Option<Outcome>> {
        if let Request::Wait { .. } | Request::WaitGet { .. } = request {
            if !self.lagging {
                return Ok(Some(Outcome::Silent)); // its view is current
            }
        }
        self.applied.push((conn, ticket, request.clone()));
        Ok(None)
    }
    fn holds_leased_keys(&self) -> bool {
        false
    }
    fn delete_leased(&mut self, _: Vec<Key>) {
        unreachable!("it holds no leased keys")
    }
    fn peek(&self, key: &[u8]) -> Option<Present> {
        self.known.get(key).cloned()
    }
    fn look(&mut self, wait: WaitId, keys: Vec<Key>) {
        self.looks.push((wait, keys));
    }
    fn reports_writes(&self) -> bool {
        true
    }
    fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }
    fn value_len(&self, _: &[u8]) -> Option<usize> {
        None
    }

    fn holds_queue(&self, _: &[u8]) -> bool {
        false
    }

    fn usage(&self) -> Usage {
        Usage::default()
    }
}

fn scripted() -> ServerCore<Scripted> {
    ServerCore::new(Scripted::default(), limits(), true, Instant::now())
}

fn written(key: &str, value: &[u8]) -> Report {
    Report::Written {
        key: key.as_bytes().to_vec(),
        present: Present::Value(value.into()),
    }
}

#[test]
fn a_remote_write_ends_the_wait_when_reported_not_when_made() {
    let mut c = scripted();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 0, &wait(&["/q"]));
    send(&mut c, 1, &wait(&["/q"]));
    assert!(c.wants_input(0), "a wait does not hold the connection");
    // A push through this server completes: nobody is woken yet (the
    // backend reports it like anyone's write, and one push wakes one).
    open(&mut c, 2);
    send(
        &mut c,
        2,
        &Encoder::request(Command::QueuePush)
            .bytes(b"/q")
            .bytes(b"1")
            .finish(),
    );
    let (conn, ticket, _) = c.backend.applied.pop().unwrap();
    c.backend.known.insert(b"/q".to_vec(), Present::Queued);
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Silent),
    });
    assert!(c.take_backend_reports().is_empty());
    assert_eq!(c.stats().pending_waits, 2);
    c.backend.reports.push(Report::Written {
        key: b"/q".to_vec(),
        present: Present::Queued,
    });
    c.take_backend_reports();
    assert_eq!(replies(&mut c, 0), [STOP_WAITING], "the oldest");
    assert!(replies(&mut c, 1).is_empty());
}

#[test]
fn wait_get_on_a_remote_backend_answers_with_the_values_seen() {
    let mut c = scripted();
    open_v2(&mut c, 0);
    c.backend
        .known
        .insert(b"/a".to_vec(), Present::Value(b"1".as_slice().into()));
    send(
        &mut c,
        0,
        &Encoder::request(Command::WaitGet)
            .keys(&["/b", "/a"])
            .finish(),
    );
    assert!(replies(&mut c, 0).is_empty(), "/b is still missing");
    c.backend.known.remove(b"/a".as_slice());
    c.backend.reports.push(written("/b", b"2"));
    c.take_backend_reports();
    let mut expected = vec![REPLY_OK, STOP_WAITING];
    expected.extend(byte_string(b"2"));
    expected.extend(byte_string(b"1"));
    assert_eq!(
        replies(&mut c, 0),
        expected,
        "in the request's order, /a as seen"
    );
}

#[test]
fn a_barrier_on_a_remote_backend_counts_arrivals_reported_before_its_own() {
    let mut c = scripted();
    open(&mut c, 0);
    send(
        &mut c,
        0,
        &Encoder::request(Command::Barrier)
            .bytes(b"/b")
            .u64(2)
            .finish(),
    );
    let (conn, ticket, arrive) = c.backend.applied.pop().unwrap();
    assert_eq!(
        arrive,
        Request::Add {
            key: b"/b".to_vec(),
            delta: 1
        }
    );
    // The other server's arrival (the second) is reported first.
    c.backend.reports.push(written("/b", b"2"));
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Int(1)),
    });
    assert!(c.take_backend_reports().is_empty());
    assert_eq!(replies(&mut c, 0), [STOP_WAITING]);
    assert_eq!(c.stats().pending_waits, 0);
    assert!(c.wants_input(0));
}

#[test]
fn a_failed_remote_barrier_takes_its_wait_back() {
    let mut c = scripted();
    open(&mut c, 0);
    let barrier = Encoder::request(Command::Barrier)
        .bytes(b"/b")
        .u64(2)
        .finish();
    send(&mut c, 0, &barrier);
    let (conn, ticket, _) = c.backend.applied.pop().unwrap();
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Err(crate::Error::network("etcd: no member answered")),
    });
    let refused = c.take_backend_reports();
    assert_eq!(refused.len(), 1, "a PyTorch connection is closed");
    assert_eq!(c.stats().pending_waits, 0);
}

#[test]
fn a_wait_starts_once_the_backends_view_shows_the_connections_writes() {
    let mut c = scripted();
    open_v2(&mut c, 0);
    c.backend.lagging = true;
    let mut pipelined = set("/k", b"new");
    pipelined.extend(Encoder::request(Command::WaitGet).keys(&["/k"]).finish());
    send(&mut c, 0, &pipelined);
    let (conn, ticket, _) = c.backend.applied.remove(0);
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Silent),
    });
    c.backend
        .known
        .insert(b"/k".to_vec(), Present::Value(b"old".as_slice().into()));
    c.take_backend_reports();
    assert!(
        replies(&mut c, 0).is_empty(),
        "not from a view without the set"
    );
    let (conn, ticket, wait) = c.backend.applied.remove(0);
    assert!(matches!(wait, Request::WaitGet { .. }));
    c.backend
        .known
        .insert(b"/k".to_vec(), Present::Value(b"new".as_slice().into()));
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Silent),
    });
    c.take_backend_reports();
    let mut expected = vec![REPLY_OK, STOP_WAITING];
    expected.extend(byte_string(b"new"));
    assert_eq!(replies(&mut c, 0), expected);
}

#[test]
fn missed_writes_make_every_pending_wait_look_again() {
    let mut c = scripted();
    open(&mut c, 0);
    open(&mut c, 1);
    c.backend
        .known
        .insert(b"/x".to_vec(), Present::Value(b"1".as_slice().into()));
    send(&mut c, 0, &wait(&["/x", "/y"]));
    send(&mut c, 1, &wait(&["/z"]));
    c.backend.reports.push(Report::Missed);
    c.take_backend_reports();
    let mut looks: Vec<Vec<Key>> = c.backend.looks.drain(..).map(|(_, k)| k).collect();
    looks.sort();
    assert_eq!(looks, [vec![b"/y".to_vec()], vec![b"/z".to_vec()]]);
    let wait_on_z = c
        .waits
        .outstanding()
        .into_iter()
        .find(|(_, k)| k == &[b"/z".to_vec()]);
    c.backend.reports.push(Report::Looked {
        wait: wait_on_z.unwrap().0,
        found: vec![(b"/z".to_vec(), Present::Value(b"3".as_slice().into()))],
    });
    c.take_backend_reports();
    assert_eq!(replies(&mut c, 1), [STOP_WAITING], "the look found it");
    assert_eq!(c.stats().pending_waits, 1);
}

#[test]
fn a_remote_queue_element_wakes_one_waiter() {
    let mut c = scripted();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 0, &wait(&["/q"]));
    send(&mut c, 1, &wait(&["/q"]));
    c.backend.reports.push(Report::Written {
        key: b"/q".to_vec(),
        present: Present::Queued,
    });
    c.take_backend_reports();
    assert_eq!(c.take_woken(), [0], "the oldest");
    assert_eq!(c.stats().pending_waits, 1);
}
