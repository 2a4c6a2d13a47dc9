//! Waiting for a file to change: inotify when the kernel offers it (local
//! filesystems), with a bounded exponential backoff as the fallback and as a
//! safety net (network filesystems do not deliver inotify events for other
//! hosts' writes).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::os;

const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// Watches one file for modification.
pub(crate) struct Watcher {
    inotify: Option<OwnedFd>,
    backoff: Duration,
}

impl Watcher {
    /// A watcher of `path` (inotify if available).
    pub(crate) fn new(path: &Path) -> Watcher {
        Watcher {
            inotify: inotify_on(path),
            backoff: FIRST_BACKOFF,
        }
    }

    /// Starts a new wait: the backoff begins small again.
    pub(crate) fn reset(&mut self) {
        self.backoff = FIRST_BACKOFF;
    }

    /// Blocks until the file may have changed, the backoff interval passes,
    /// or `deadline` comes, whichever is first.
    pub(crate) fn wait(&mut self, deadline: Option<Instant>) {
        let mut pause = self.backoff;
        if let Some(deadline) = deadline {
            pause = pause.min(deadline.saturating_duration_since(Instant::now()));
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        match &self.inotify {
            Some(fd) => {
                let timeout = pause.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
                if os::poll_one(fd.as_raw_fd(), libc::POLLIN, timeout).is_ok_and(|r| r != 0) {
                    os::drain(fd.as_fd());
                }
            }
            None => std::thread::sleep(pause),
        }
    }
}

fn inotify_on(path: &Path) -> Option<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mask = libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
    os::inotify_watch(&c_path, mask).ok()
}
