//! distcore: the coordination plane of PyTorch's `torch.distributed` without
//! PyTorch — key-value stores, the `Work` completion handle and remote
//! references — as a Rust library with a C ABI (`include/distcore.h`).
//!
//! The Rust core knows nothing of C; [`ffi`] is the only module with raw
//! pointers and `extern "C"` functions. `unsafe` is denied everywhere but
//! there and in `os`, the safe wrappers over the operating system's calls.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod error;
#[allow(unsafe_code)]
pub mod ffi;
pub(crate) mod net;
#[allow(unsafe_code)]
pub(crate) mod os;
pub mod printable;
pub mod rpc;
pub mod runtime;
pub mod security;
pub mod store;
pub mod work;

pub use error::{Error, Result, Status};
pub use work::{OpType, Work};

/// The version of distcore, as `major.minor.patch`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The architecture's rules that the compiler does not check.
#[cfg(test)]
mod architecture {
    /// The socket-free cores: protocol logic that takes bytes and messages
    /// in and gives them out, with time passed in.
    const CORES: [(&str, &str); 8] = [
        ("server core", include_str!("store/tcp/server/state.rs")),
        ("waits", include_str!("store/tcp/server/waits.rs")),
        ("request parser", include_str!("store/tcp/parser.rs")),
        ("protocol", include_str!("store/tcp/protocol.rs")),
        ("reply decoding", include_str!("store/tcp/client/reply.rs")),
        ("plans", include_str!("store/tcp/client/plan.rs")),
        ("RRef state", include_str!("rpc/context/state.rs")),
        ("handshake proofs", include_str!("security/auth.rs")),
    ];

    /// What a core may not use: sockets and event loops, the OS, threads,
    /// locks, the clock (its driver holds the lock and reads the clock).
    const FORBIDDEN: [&str; 12] = [
        "mio::",
        "libc::",
        "std::net",
        "std::thread",
        "thread::spawn",
        "Mutex",
        "RwLock",
        "Condvar",
        "Instant::now",
        "SystemTime::now",
        ".elapsed()",
        "crate::os",
    ];

    #[test]
    fn cores_touch_no_socket_thread_lock_or_clock() {
        let mut found = Vec::new();
        for (core, source) in CORES {
            let code = source
                .lines()
                .enumerate()
                .filter(|(_, line)| !line.trim_start().starts_with("//"));
            for (number, line) in code {
                for forbidden in FORBIDDEN.iter().filter(|f| line.contains(*f)) {
                    found.push(format!("{core}, line {}: {forbidden}", number + 1));
                }
            }
        }
        assert!(found.is_empty(), "{found:#?}");
    }
}
