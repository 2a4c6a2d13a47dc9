//! Waiting for a file to change: inotify when the kernel offers it (local
//! filesystems), with a bounded exponential backoff as the fallback and as a
//! safety net (network filesystems do not deliver inotify events for other
//! hosts' writes).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

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
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready =
                    unsafe { libc::poll(&mut p, 1, pause.as_millis().max(1) as libc::c_int) };
                if ready > 0 {
                    drain(fd);
                }
            }
            None => std::thread::sleep(pause),
        }
    }
}

fn inotify_on(path: &Path) -> Option<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: inotify_init1 has no preconditions; the result is checked.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mask = libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
    // SAFETY: a valid descriptor and NUL-terminated path.
    let watch = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), mask) };
    (watch >= 0).then_some(fd)
}

/// Reads away pending events so the next poll waits for new ones.
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    // SAFETY: reads into a live local buffer of the given size.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}
