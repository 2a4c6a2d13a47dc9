//! Waiting for the signals that end a server process, SIGINT and SIGTERM,
//! in one thread of the program's choosing (the CLI's `serve`): blocked in
//! every thread, received by [`TerminationSignals::wait`].

use crate::error::{Error, Result};

/// SIGINT and SIGTERM, blocked, to wait for.
pub struct TerminationSignals(crate::os::BlockedSignals);

impl TerminationSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread. Call it before
    /// starting any thread: threads inherit the mask, so that no thread is
    /// interrupted by them and only [`TerminationSignals::wait`] receives
    /// them.
    pub fn block() -> Result<TerminationSignals> {
        crate::os::block_signals(&[libc::SIGINT, libc::SIGTERM])
            .map(TerminationSignals)
            .map_err(|e| Error::internal(format!("blocking SIGINT and SIGTERM: {e}")))
    }

    /// Blocks the calling thread until SIGINT or SIGTERM arrives: its
    /// number.
    pub fn wait(&self) -> Result<i32> {
        crate::os::wait_signal(&self.0)
            .map_err(|e| Error::internal(format!("waiting for SIGINT or SIGTERM: {e}")))
    }
}
