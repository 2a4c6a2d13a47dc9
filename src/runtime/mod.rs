//! Process-wide machinery every layer may use: the timer thread
//! ([`timer`]), what a fork leaves behind ([`fork`]), timeouts and
//! deadlines ([`timeout`]), logging ([`logging`]) and the signals that end
//! a server process ([`signals`]).

pub(crate) mod fork;
pub mod logging;
pub mod signals;
pub mod timeout;
pub(crate) mod timer;
