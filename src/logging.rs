//! A minimal stderr logger, so that C and FFI hosts see why a server closed
//! a connection without bringing a logging framework. Installed once, the
//! first time a server starts, unless the host installed its own `log`
//! logger. The level comes from `DISTCORE_LOG` (off, error, warn, info,
//! debug, trace; default warn).

use std::io::Write;
use std::sync::Once;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "[distcore {}] {}",
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;
static INIT: Once = Once::new();

/// Installs the stderr logger unless a logger is already installed.
pub fn init() {
    INIT.call_once(|| {
        let level = std::env::var("DISTCORE_LOG")
            .ok()
            .and_then(|v| v.parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::Warn);
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(level);
        }
    });
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
