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
