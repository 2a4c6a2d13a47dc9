//! The process-wide profiling hook: the begin/end pair that c10d's Work drives
//! through `RecordFunction` when a work has a profiling title.

use std::sync::Arc;

use once_cell::sync::Lazy;
use parking_lot::RwLock;

/// Receives the begin and end of every profiled span (a work with a title).
///
/// `begin` runs on the thread that creates the work, `end` on the thread that
/// finishes it (or drops it unfinished), exactly once per `begin`.
pub trait ProfilerHooks: Send + Sync {
    /// A span named `title` begins; the returned token is handed to `end`.
    fn begin(&self, title: &str) -> u64;
    /// The span that `begin` returned `token` for ends.
    fn end(&self, title: &str, token: u64);
}

static HOOKS: Lazy<RwLock<Option<Arc<dyn ProfilerHooks>>>> = Lazy::new(|| RwLock::new(None));

/// Installs (or with `None`, removes) the process-wide profiler hooks. Spans
/// already begun end on the hooks that began them.
pub fn set_profiler_hooks(hooks: Option<Arc<dyn ProfilerHooks>>) {
    *HOOKS.write() = hooks;
}

/// An open span; ends when dropped, so `end` runs exactly once.
pub(crate) struct Span {
    hooks: Arc<dyn ProfilerHooks>,
    title: String,
    token: u64,
}

impl Span {
    /// Begins a span named `title` if hooks are installed.
    pub(crate) fn begin(title: &str) -> Option<Span> {
        let hooks = HOOKS.read().clone()?;
        let token = hooks.begin(title);
        Some(Span {
            hooks,
            title: title.to_owned(),
            token,
        })
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.hooks.end(&self.title, self.token);
    }
}
