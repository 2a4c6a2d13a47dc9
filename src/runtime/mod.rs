//! Process-wide machinery every layer may use: the timer thread
//! ([`timer`]), what a fork leaves behind ([`fork`]), timeouts and
//! deadlines ([`timeout`]) and logging ([`logging`]).

pub(crate) mod fork;
pub mod logging;
pub mod timeout;
pub(crate) mod timer;
