//! distcore's logger, so that C and FFI hosts see why a server closed a
//! connection without bringing a logging framework: lines go to stderr, or
//! to a sink the host installs ([`set_sink`]; `dc_set_log_callback` in C).
//! Installed the first time a handle is made, unless the host installed
//! its own `log` logger. The stderr level comes from `DISTCORE_LOG` (off,
//! error, warn, info, debug, trace; default warn); a sink comes with its
//! own level. Either gets distcore's own lines only (targets `distcore`
//! and `distcore::...`), never its dependencies' (mio's, rustls's).

use std::io::Write;
use std::sync::Once;

use log::{LevelFilter, Log, Metadata, Record};
use parking_lot::RwLock;

use crate::error::{Error, Result, Status};

/// How verbose a log line is. The numbers are part of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i32)]
pub enum LogLevel {
    /// No lines (as a level to deliver); never the level of a line.
    Off = 0,
    /// Failures the job should know about.
    Error = 1,
    /// Something went wrong and was handled (a connection closed for a bad request, ...).
    Warn = 2,
    /// Lifecycle: servers started and stopped, workers joined.
    Info = 3,
    /// Detail for debugging distcore's use.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

impl LogLevel {
    /// The level with this number, if there is one.
    pub fn from_code(code: i32) -> Option<LogLevel> {
        [
            LogLevel::Off,
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ]
        .into_iter()
        .find(|l| *l as i32 == code)
    }

    fn filter(self) -> LevelFilter {
        match self {
            LogLevel::Off => LevelFilter::Off,
            LogLevel::Error => LevelFilter::Error,
            LogLevel::Warn => LevelFilter::Warn,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Debug => LevelFilter::Debug,
            LogLevel::Trace => LevelFilter::Trace,
        }
    }

    fn of(level: log::Level) -> LogLevel {
        match level {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Trace => LogLevel::Trace,
        }
    }
}

/// Where a host wants log lines: called with the line's level, its target
/// (the module, e.g. "distcore::store::tcp::server") and its text.
pub type Sink = Box<dyn Fn(LogLevel, &str, &str) + Send + Sync>;

struct Logger {
    sink: RwLock<Option<Sink>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() && is_distcore(metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // A line logged from inside the sink (by a distcore call it makes)
        // goes to stderr: taking the lock again could deadlock.
        if !IN_SINK.get() {
            if let Some(sink) = &*self.sink.read() {
                IN_SINK.set(true);
                sink(
                    LogLevel::of(record.level()),
                    record.target(),
                    &record.args().to_string(),
                );
                IN_SINK.set(false);
                return;
            }
        }
        let _ = writeln!(
            std::io::stderr().lock(),
            "[distcore {}] {}",
            record.level(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Whether a line with `target` is distcore's (its module path).
fn is_distcore(target: &str) -> bool {
    target
        .strip_prefix("distcore")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

thread_local! {
    /// This thread is running the sink.
    static IN_SINK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static LOGGER: Logger = Logger {
    sink: RwLock::new(None),
};
static INIT: Once = Once::new();
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs distcore's logger (to stderr at `DISTCORE_LOG`'s level) unless
/// a logger is already installed.
pub fn init() {
    INIT.call_once(|| {
        let level = std::env::var("DISTCORE_LOG")
            .ok()
            .and_then(|v| v.parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::Warn);
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(level);
            INSTALLED.store(true, std::sync::atomic::Ordering::Release);
        }
    });
}

/// Sends lines at `level` or more severe to `sink` (`None`: to stderr).
/// When this returns, the previous sink is no longer running and is
/// dropped. `DC_ERR_INVALID_STATE` when the host installed a `log` logger
/// of its own (a Rust host: configure that one instead), or when called
/// from inside the sink (it would wait for itself to return).
pub fn set_sink(level: LogLevel, sink: Option<Sink>) -> Result<()> {
    init();
    if IN_SINK.get() {
        return Err(Error::new(
            Status::InvalidState,
            "the log callback cannot be changed from inside the log callback",
        ));
    }
    if !INSTALLED.load(std::sync::atomic::Ordering::Acquire) {
        return Err(Error::new(
            Status::InvalidState,
            "the process installed a `log` logger of its own; distcore logs through it",
        ));
    }
    let previous = std::mem::replace(&mut *LOGGER.sink.write(), sink);
    log::set_max_level(level.filter());
    drop(previous);
    Ok(())
}

/// Lets a recurring log line through at most once per interval, counting
/// the occurrences it held back (so a flood of refused connections is a
/// line every few seconds with a count, not a line each). Time is passed
/// in.
#[derive(Debug)]
pub(crate) struct Throttle {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    held_back: u64,
}

impl Throttle {
    /// A throttle letting one line through per `interval`.
    pub(crate) const fn new(interval: std::time::Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            held_back: 0,
        }
    }

    /// Whether to log an occurrence at `now`; `Some(n)`: yes, and `n`
    /// occurrences were held back since the last line.
    pub(crate) fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn only_distcores_lines_are_delivered() {
        assert!(is_distcore("distcore"));
        assert!(is_distcore("distcore::store::tcp::server"));
        assert!(!is_distcore("mio::poll"));
        assert!(!is_distcore("rustls::server::hs"));
        assert!(!is_distcore("distcore_plugin"), "another crate");
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(t.allow(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), Some(500));
        assert_eq!(t.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(25)), Some(1));
    }
}
