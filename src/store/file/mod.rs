//! FileStore: a store in one file shared by processes on a host or a shared
//! filesystem, in PyTorch's format, so PyTorch and distcore processes can
//! use the same file at once (c10d's `FileStore`).
//!
//! Every operation takes `flock` on the file (shared to read, exclusive to
//! append), replays the records appended since this handle last looked
//! (never the whole file again), and works on that replay.

mod log;
mod watch;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::log::{
    looks_like_a_log, record, Replay, CLEANUP_KEY, DELETE_PREFIX, QUEUE_POP_PREFIX,
    QUEUE_PUSH_PREFIX, REFCOUNT_KEY, USER_PREFIX,
};
use self::watch::Watcher;
use super::kv::compare_set_swaps;
use super::{check_multi_set_lengths, wait_timeout_error, Store};

use crate::error::{Error, Result, Status};
use crate::net::bigbuf::{check_allocatable, try_copy};
use crate::os;
use crate::printable::printable;
use crate::runtime::timeout::{deadline_after, DEFAULT_STORE_TIMEOUT};

/// How long a lock attempt backs off between tries.
const LOCK_BACKOFF: Duration = Duration::from_millis(1);

/// A handle on a FileStore. Each handle counts in `refcount/`; when the last
/// one closes and `world_size` handles have closed, the file is removed (as
/// PyTorch does). Thread-safe.
pub struct FileStore {
    path: PathBuf,
    world_size: Option<u32>,
    state: Mutex<State>,
    timeout: Mutex<Duration>,
}

struct State {
    /// Shared with the lock held on it ([`FileLock`]).
    file: Arc<File>,
    /// Bytes of the log already replayed.
    pos: u64,
    replay: Replay,
    watcher: Watcher,
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::new(
        Status::Io,
        format!("FileStore {}: {what}: {e}", path.display()),
    )
}

fn user_key(key: &str) -> Vec<u8> {
    [USER_PREFIX, key.as_bytes()].concat()
}

fn parse_counter(key: &[u8], value: Option<&Vec<u8>>) -> Result<i64> {
    match value {
        None => Ok(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "add: the value of key '{}' is not an integer",
                    printable(key)
                ))
            }),
    }
}

/// An exclusive or shared flock on the store file, released on drop.
struct FileLock {
    file: Arc<File>,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = os::flock(self.file.as_fd(), libc::LOCK_UN);
    }
}

/// Takes `flock` on `fd`, retrying until `timeout` (zero: forever).
fn lock_file(
    path: &Path,
    file: &Arc<File>,
    exclusive: bool,
    timeout: Duration,
) -> Result<FileLock> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    let deadline = deadline_after(timeout);
    loop {
        match os::flock(file.as_fd(), op) {
            Ok(()) => return Ok(FileLock { file: file.clone() }),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_error(path, "flock", e)),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::timeout(format!(
                "FileStore {}: timed out after {}ms waiting for the file lock",
                path.display(),
                timeout.as_millis()
            )));
        }
        std::thread::sleep(LOCK_BACKOFF);
    }
}

impl State {
    /// Replays what other handles appended; returns whether the file ends in
    /// an incomplete record.
    fn refresh(&mut self, path: &Path) -> Result<bool> {
        let mut fresh = Vec::new();
        let mut file = &*self.file;
        file.seek(SeekFrom::Start(self.pos))
            .map_err(|e| io_error(path, "seek", e))?;
        file.read_to_end(&mut fresh)
            .map_err(|e| io_error(path, "read", e))?;
        let parsed = self.replay.apply(&fresh);
        self.pos += parsed.consumed as u64;
        Ok(parsed.incomplete_tail)
    }

    /// Appends records, under an exclusive lock the caller holds, after
    /// cutting off an incomplete record a dead writer left.
    fn append(&mut self, path: &Path, records: &[(Vec<u8>, &[u8])]) -> Result<()> {
        if self.refresh(path)? {
            ::log::warn!(
                "FileStore {}: dropping an incomplete record at byte {} (a writer died mid-append)",
                path.display(),
                self.pos
            );
            self.file
                .set_len(self.pos)
                .map_err(|e| io_error(path, "truncate", e))?;
        }
        let mut bytes = Vec::new();
        for (key, value) in records {
            bytes.extend(record(key, value));
        }
        let mut file = &*self.file;
        file.seek(SeekFrom::Start(self.pos))
            .map_err(|e| io_error(path, "seek", e))?;
        file.write_all(&bytes)
            .map_err(|e| io_error(path, "write", e))?;
        // Our own records replay like anyone's.
        let parsed = self.replay.apply(&bytes);
        self.pos += parsed.consumed as u64;
        Ok(())
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.replay.values.contains_key(key)
            || self.replay.queues.get(key).is_some_and(|q| !q.is_empty())
    }
}

impl FileStore {
    /// Opens (creating it if needed) the store file at `path` and counts
    /// this handle in. `world_size`: the number of handles expected, which
    /// decides when the file is removed (PyTorch's `numWorkers`; `None` for
    /// -1: never removed).
    pub fn new(path: impl AsRef<Path>, world_size: Option<u32>) -> Result<FileStore> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error(&path, "cannot open", e))?;
        let mut head = Vec::new();
        (&mut file)
            .take(64)
            .read_to_end(&mut head)
            .map_err(|e| io_error(&path, "read", e))?;
        if !looks_like_a_log(&head) {
            return Err(Error::invalid_argument(format!(
                "FileStore {}: the file exists and is not a FileStore log",
                path.display()
            )));
        }
        let store = FileStore {
            world_size,
            state: Mutex::new(State {
                file: Arc::new(file),
                pos: 0,
                replay: Replay::default(),
                watcher: Watcher::new(&path),
            }),
            timeout: Mutex::new(DEFAULT_STORE_TIMEOUT),
            path,
        };
        store.add_raw(REFCOUNT_KEY, 1)?;
        Ok(store)
    }

    /// The path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replays new records under a shared lock, then runs `f` on the state.
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T> {
        let mut state = self.state.lock();
        {
            let _lock = lock_file(&self.path, &state.file, false, self.timeout())?;
            state.refresh(&self.path)?;
        }
        Ok(f(&state))
    }

    /// Under an exclusive lock, replays new records, lets `decide` compute
    /// what to append from the current state, appends it, and returns the
    /// decision's result.
    fn write<T>(
        &self,
        decide: impl FnOnce(&State) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, T)>,
    ) -> Result<T> {
        let mut state = self.state.lock();
        let _lock = lock_file(&self.path, &state.file, true, self.timeout())?;
        state.refresh(&self.path)?;
        let (records, result) = decide(&state)?;
        if !records.is_empty() {
            let records: Vec<(Vec<u8>, &[u8])> =
                records.iter().map(|(k, v)| (k.clone(), &v[..])).collect();
            state.append(&self.path, &records)?;
        }
        Ok(result)
    }

    fn add_raw(&self, key: &[u8], delta: i64) -> Result<i64> {
        self.write(|state| {
            let current = parse_counter(key, state.replay.values.get(key))?;
            let new = current.checked_add(delta).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "add: {current} + {delta} overflows a 64-bit counter"
                ))
            })?;
            Ok((vec![(key.to_vec(), new.to_string().into_bytes())], new))
        })
    }

    /// Blocks until `ready` holds on the replayed state, watching the file;
    /// `Ok(false)` when `timeout` passed first.
    fn wait_for(&self, timeout: Duration, ready: impl Fn(&State) -> bool) -> Result<bool> {
        let deadline = deadline_after(timeout);
        self.state.lock().watcher.reset();
        loop {
            if self.read(&ready)? {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            self.state.lock().watcher.wait(deadline);
        }
    }

    fn wait_keys(&self, keys: &[&str], timeout: Duration) -> Result<bool> {
        let wire: Vec<Vec<u8>> = keys.iter().map(|k| user_key(k)).collect();
        self.wait_for(timeout, |s| wire.iter().all(|k| s.contains(k)))
    }
}

/// Checks a value against the file format, whose records carry `u32`
/// lengths (PyTorch's FileStore checks the same).
fn check_value(value_len: usize, what: &str) -> Result<()> {
    if value_len > u32::MAX as usize {
        return Err(Error::invalid_argument(format!(
            "{what}: a FileStore value holds at most {} bytes, not {value_len}",
            u32::MAX
        )));
    }
    check_allocatable(value_len, what)
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        check_value(value.len(), "set")?;
        self.write(|_| Ok((vec![(user_key(key), value.to_vec())], ())))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let timeout = self.timeout();
        if !self.wait_keys(&[key], timeout)? {
            return Err(Error::timeout(format!(
                "Timeout waiting for key: {} after {} ms",
                printable(key.as_bytes()),
                timeout.as_millis()
            )));
        }
        let wire = user_key(key);
        self.read(|s| s.replay.values.get(&wire).cloned().unwrap_or_default())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.add_raw(&user_key(key), delta)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        check_value(expected.len(), "compare_set")?;
        check_value(desired.len(), "compare_set")?;
        let wire = user_key(key);
        self.write(|s| {
            let current = s.replay.values.get(&wire).map(Vec::as_slice);
            Ok(match compare_set_swaps(current, expected) {
                true => (vec![(wire.clone(), desired.to_vec())], desired.to_vec()),
                false => (Vec::new(), current.unwrap_or(expected).to_vec()),
            })
        })
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        let wire = user_key(key);
        self.write(|s| {
            let existed = s.replay.values.contains_key(&wire);
            Ok((vec![([DELETE_PREFIX, &wire].concat(), Vec::new())], existed))
        })
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let wire: Vec<Vec<u8>> = keys.iter().map(|k| user_key(k)).collect();
        self.read(|s| wire.iter().all(|k| s.contains(k)))
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        if self.wait_keys(keys, timeout)? {
            Ok(())
        } else {
            Err(wait_timeout_error(timeout, keys))
        }
    }

    /// Every key in the file, `refcount/` and `cleanup/` included, as
    /// PyTorch's FileStore counts.
    fn num_keys(&self) -> Result<i64> {
        self.read(|s| s.replay.values.len() as i64)
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        let wire = user_key(key);
        self.write(|s| {
            let current = s.replay.values.get(&wire).map_or(&[][..], Vec::as_slice);
            check_value(current.len().saturating_add(value.len()), "append")?;
            let mut new = try_copy(current, "append")?;
            new.try_reserve_exact(value.len())
                .map_err(|_| Error::invalid_argument("append: out of memory"))?;
            new.extend_from_slice(value);
            Ok((vec![(wire.clone(), new)], ()))
        })
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        let timeout = self.timeout();
        if !self.wait_keys(keys, timeout)? {
            return Err(wait_timeout_error(timeout, keys));
        }
        self.read(|s| {
            keys.iter()
                .map(|k| {
                    s.replay
                        .values
                        .get(&user_key(k))
                        .cloned()
                        .unwrap_or_default()
                })
                .collect()
        })
    }

    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        check_multi_set_lengths(keys, values)?;
        for value in values {
            check_value(value.len(), "multi_set")?;
        }
        self.write(|_| {
            Ok((
                keys.iter()
                    .zip(values)
                    .map(|(k, v)| (user_key(k), v.to_vec()))
                    .collect(),
                (),
            ))
        })
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        check_value(value.len(), "queue_push")?;
        self.write(|_| {
            Ok((
                vec![([QUEUE_PUSH_PREFIX, &user_key(key)].concat(), value.to_vec())],
                (),
            ))
        })
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>> {
        let wire = user_key(key);
        let timeout = self.timeout();
        let deadline = deadline_after(timeout);
        loop {
            let popped = self.write(|s| {
                Ok(match s.replay.queues.get(&wire).and_then(|q| q.front()) {
                    Some(front) => (
                        vec![([QUEUE_POP_PREFIX, &wire].concat(), Vec::new())],
                        Some(front.clone()),
                    ),
                    None => (Vec::new(), None),
                })
            })?;
            if let Some(value) = popped {
                return Ok(value);
            }
            if !block {
                return Err(Error::new(Status::QueueEmpty, "queue is empty"));
            }
            let left = deadline.map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if deadline.is_some() && left.is_zero() {
                return Err(wait_timeout_error(timeout, &[key]));
            }
            let has_item = |s: &State| s.replay.queues.get(&wire).is_some_and(|q| !q.is_empty());
            if !self.wait_for(left, has_item)? {
                return Err(wait_timeout_error(timeout, &[key]));
            }
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64> {
        let wire = user_key(key);
        self.read(|s| s.replay.queues.get(&wire).map_or(0, |q| q.len() as i64))
    }

    fn list_keys(&self) -> Result<Vec<String>> {
        self.read(|s| {
            s.replay
                .values
                .keys()
                .filter_map(|k| k.strip_prefix(USER_PREFIX))
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect()
        })
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock()
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock() = timeout;
    }

    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        let clone = FileStore::new(&self.path, self.world_size)?;
        clone.set_timeout(self.timeout());
        Ok(Arc::new(clone))
    }
}

impl Drop for FileStore {
    /// PyTorch's FileStore destructor: count in `cleanup/`, count out of
    /// `refcount/`; the last handle removes the file once `world_size`
    /// handles have closed.
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let closing = || -> Result<()> {
            let finished = self.add_raw(CLEANUP_KEY, 1)?;
            let remaining = self.add_raw(REFCOUNT_KEY, -1)?;
            if let Some(world) = self.world_size {
                if remaining == 0 && finished >= i64::from(world) {
                    let _ = std::fs::remove_file(&self.path);
                }
            }
            Ok(())
        };
        if let Err(e) = closing() {
            ::log::warn!("FileStore {}: closing: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests;
