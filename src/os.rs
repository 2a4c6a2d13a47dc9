//! The library's one home of `unsafe` outside `ffi/`: safe wrappers over
//! the operating system's calls that std and socket2 do not offer, and
//! over the two things about memory Rust cannot check by itself (memory
//! the kernel fills, and a value leaked for the process's life). Each
//! wrapper takes only what makes its call sound (buffers as slices or
//! vectors, lengths taken from them), so no caller can misuse it into
//! memory unsafety: a descriptor number the caller no longer owns makes a
//! call fail or act on another file, never corrupt memory. The crate root
//! denies `unsafe` everywhere else.

use std::ffi::CStr;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `n` from a call that returns -1 on failure, or the OS's error.
fn result(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A fresh descriptor from a call returning one (or -1), now owned.
fn owned(raw: libc::c_int) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just made, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// One non-blocking `recv` with `flags` into `buf` (0: the peer closed),
/// retried when interrupted; `WouldBlock` when nothing is there.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: initialised bytes are valid `MaybeUninit<u8>`s, and recv
    // writes only bytes into them.
    let target = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    recv_uninit(fd, target, flags)
}

/// [`recv`] into memory that need not be initialised.
fn recv_uninit(fd: RawFd, target: &mut [MaybeUninit<u8>], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: `target` is writable for its length.
        let n = unsafe {
            libc::recv(
                fd,
                target.as_mut_ptr().cast(),
                target.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        match result(n) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// One non-blocking `recv` of at most `max` bytes appended to `buf`,
/// straight into its spare capacity (no zeroing first: the point, for
/// values of many MiB); 0: the peer closed.
pub(crate) fn recv_append(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let n = recv_uninit(fd, &mut buf.spare_capacity_mut()[..max], 0)?;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity
    // (n <= max, the length it was given).
    unsafe { buf.set_len(buf.len() + n.min(max)) };
    Ok(n)
}

/// How many bytes `fd`'s socket has received and not yet been read
/// (FIONREAD).
pub(crate) fn unread_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// One `recv` into `buf` that waits, on a socket in blocking mode, until
/// bytes arrive or the socket's receive timeout ([`set_recv_timeout`])
/// passes (`WouldBlock`); `Interrupted` when a signal came first. 0: the
/// peer closed.
pub(crate) fn recv_waiting(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    result(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
}

/// Sets the socket's receive timeout: how long [`recv_waiting`] waits
/// (`None`: without limit). A timeout below a microsecond is one.
pub(crate) fn set_recv_timeout(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let tv = match timeout {
        None => libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        Some(t) => libc::timeval {
            tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_usec: t.subsec_micros().max(u32::from(t.as_secs() == 0)) as libc::suseconds_t,
        },
    };
    // SAFETY: one live timeval, and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    result(rc as isize).map(drop)
}

/// Writes as much of `buf` as the socket takes now, in one call, whatever
/// the socket's mode (`send` with `MSG_DONTWAIT` and `MSG_NOSIGNAL`: a
/// closed peer is `EPIPE`, never SIGPIPE).
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    // SAFETY: the buffer is live and readable for its length.
    result(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) })
}

/// Writes as much of `bufs`, in order, as the socket takes now, in one
/// `sendmsg` (`MSG_DONTWAIT`, `MSG_NOSIGNAL`).
pub(crate) fn send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads it.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
    // SAFETY: `msg` points at live buffers for the duration of the call.
    result(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
}

/// `poll` on one descriptor for `events`, up to `timeout_ms` (-1: no
/// limit): the events that came (`revents`), empty when none did in time;
/// `Interrupted` when a signal came first.
pub(crate) fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one live pollfd, and its count.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    result(n as isize).map(|_| pfd.revents)
}

/// A new non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Adds 1 to an eventfd's counter (it becomes readable).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live array.
    match result(unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) })? {
        8 => Ok(()),
        _ => Err(io::ErrorKind::WriteZero.into()),
    }
}

/// `flock(fd, op)`, retried when interrupted.
pub(crate) fn flock(fd: BorrowedFd<'_>, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock has no memory-safety preconditions.
        match result(unsafe { libc::flock(fd.as_raw_fd(), op) } as isize) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(drop),
        }
    }
}

/// A non-blocking inotify descriptor watching `path` for `mask`.
pub(crate) fn inotify_watch(path: &CStr, mask: u32) -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 has no memory-safety preconditions.
    let fd = owned(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    // SAFETY: `path` is a live NUL-terminated string.
    let watch = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    result(watch as isize)?;
    Ok(fd)
}

/// Reads (and discards) what a non-blocking descriptor has to read.
pub(crate) fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 4096];
    // SAFETY: reads into a live buffer of its own length.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// Raises this process's soft limit on open files to its hard limit;
/// returns the limit now in force.
pub(crate) fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a pointer to a live rlimit.
    result(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } as isize)?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: a pointer to a live rlimit.
        result(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } as isize)?;
    }
    Ok(limit.rlim_cur)
}

/// Takes ownership of `fd`, a descriptor this process inherited from its
/// launcher to own (`serve --listen-fd`), if it is open and `expected`
/// accepts it; otherwise leaves it alone. The caller takes each number at
/// most once (see [`crate::net::listen::take_inherited_socket`]).
pub(crate) fn adopt_inherited(
    fd: RawFd,
    expected: impl FnOnce(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: asks about a number; no memory is involved.
    result(unsafe { libc::fcntl(fd, libc::F_GETFD) } as isize)?;
    // SAFETY: open (just checked), and only borrowed for the check.
    expected(unsafe { BorrowedFd::borrow_raw(fd) })?;
    // SAFETY: the launcher handed this descriptor over for this process to
    // own, and the caller takes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signals blocked in the thread that blocked them (and in the threads it
/// starts afterwards), for [`wait_signal`] to receive.
#[derive(Clone, Copy)]
pub(crate) struct BlockedSignals(libc::sigset_t);

/// Blocks `signals` in the calling thread; threads it starts later inherit
/// the mask, so none of them is interrupted by one.
pub(crate) fn block_signals(signals: &[libc::c_int]) -> io::Result<BlockedSignals> {
    // SAFETY: an all-zero sigset_t is a valid value to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a pointer to a live sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: a pointer to a live sigset_t.
        result(unsafe { libc::sigaddset(&mut set, signal) } as isize)?;
    }
    // SAFETY: pointers to a live set and to no old set.
    match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } {
        0 => Ok(BlockedSignals(set)),
        error => Err(io::Error::from_raw_os_error(error)),
    }
}

/// Waits for one of `blocked`'s signals: its number.
pub(crate) fn wait_signal(blocked: &BlockedSignals) -> io::Result<libc::c_int> {
    let mut signal = 0;
    // SAFETY: pointers to a live set and a live int.
    match unsafe { libc::sigwait(&blocked.0, &mut signal) } {
        0 => Ok(signal),
        error => Err(io::Error::from_raw_os_error(error)),
    }
}

/// Runs `handler` in the child after every fork() (it must only touch
/// atomics: it runs where only async-signal-safe code may). A failure
/// (ENOMEM) is returned.
pub(crate) fn on_fork_child(handler: extern "C" fn()) -> io::Result<()> {
    // SAFETY: registers a function pointer; no memory is handed over.
    match unsafe { libc::pthread_atfork(None, None, Some(handler)) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// A zero-filled shared buffer of `len` bytes, not shared yet (fill it
/// through `Arc::get_mut`). Fresh pages come zeroed from the kernel, so a
/// large one costs no memset.
pub(crate) fn zeroed_shared(len: usize) -> Arc<[u8]> {
    // SAFETY: zero bytes are valid `u8`s.
    unsafe { Arc::new_zeroed_slice(len).assume_init() }
}

/// Advises the kernel to back the whole pages inside `buf` with
/// transparent huge pages (Linux; elsewhere, and when the kernel says no,
/// nothing changes).
pub(crate) fn advise_huge_pages(buf: &mut [u8]) {
    advise_huge_pages_at(buf.as_mut_ptr() as usize, buf.len());
}

/// [`advise_huge_pages`] for the whole allocation of `buf`, its spare
/// capacity included.
pub(crate) fn advise_huge_pages_capacity(buf: &mut Vec<u8>) {
    advise_huge_pages_at(buf.as_mut_ptr() as usize, buf.capacity());
}

/// The advice for the `len` bytes at `ptr`, one allocation of ours.
fn advise_huge_pages_at(ptr: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = ptr.next_multiple_of(PAGE);
        let end = (ptr + len) & !(PAGE - 1);
        if end > start {
            // SAFETY: the range lies inside the caller's allocation; the
            // advice changes how pages are backed, never their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// A cell holding a `&'static T` set at run time, read without a lock:
/// values stored are leaked, for the life of the process.
pub(crate) struct StaticRef<T: 'static> {
    current: AtomicPtr<T>,
}

impl<T: 'static> StaticRef<T> {
    /// An empty cell.
    pub(crate) const fn new() -> Self {
        StaticRef {
            current: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The value last stored, if any.
    pub(crate) fn load(&self) -> Option<&'static T> {
        let ptr = self.current.load(Ordering::Acquire);
        // SAFETY: the only pointers stored come from `store`'s leaked
        // boxes, which are never freed.
        unsafe { ptr.as_ref() }
    }

    /// Leaks `value` and makes it the cell's; returns it.
    pub(crate) fn store(&self, value: T) -> &'static T {
        let leaked: &'static T = Box::leak(Box::new(value));
        self.current
            .store(leaked as *const T as *mut T, Ordering::Release);
        leaked
    }
}
