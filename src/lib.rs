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
    const CORES: [(&str, &str); 18] = [
        ("server core", include_str!("store/tcp/server/state.rs")),
        ("waits", include_str!("store/tcp/server/waits.rs")),
        ("sessions", include_str!("store/tcp/server/sessions.rs")),
        (
            "leases",
            include_str!("store/tcp/server/sessions/leases.rs"),
        ),
        ("session listing", include_str!("store/tcp/listing.rs")),
        ("roll call", include_str!("store/tcp/client/roll_call.rs")),
        ("request parser", include_str!("store/tcp/parser.rs")),
        ("protocol", include_str!("store/tcp/protocol.rs")),
        ("TCPStore handshake", include_str!("store/tcp/handshake.rs")),
        ("reply decoding", include_str!("store/tcp/client/reply.rs")),
        ("proxy relay", include_str!("store/tcp/proxy/relay.rs")),
        ("plans", include_str!("store/tcp/client/plan.rs")),
        ("RRef state", include_str!("rpc/context/state.rs")),
        ("RPC frames", include_str!("rpc/frame.rs")),
        ("RPC handshake", include_str!("rpc/handshake.rs")),
        ("RPC pending requests", include_str!("rpc/pending.rs")),
        ("handshake proofs", include_str!("security/auth.rs")),
        ("challenge-response", include_str!("security/handshake.rs")),
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
            let before_tests = source.split("#[cfg(test)]").next().unwrap_or_default();
            let code = before_tests
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

    /// The layers, lowest first: a module may use its own layer and those
    /// below it, never one above (tests aside).
    const LAYERS: [&[&str]; 6] = [
        &["error.rs", "printable.rs", "os.rs"],
        &["net", "runtime", "security"],
        &["work"],
        &["store"],
        &["rpc"],
        &["ffi"],
    ];

    /// Every `.rs` file under `path` (a file or a folder), tests left out.
    fn sources(path: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        let is_test = |p: &std::path::Path| {
            p.file_name()
                .is_some_and(|n| n == "tests.rs" || n == "tests")
        };
        if is_test(path) {
            return;
        }
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                sources(&entry.unwrap().path(), found);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path.to_owned());
        }
    }

    /// The code of a source file: no comments, no tests.
    fn code_of(file: &std::path::Path) -> String {
        let text = std::fs::read_to_string(file).unwrap();
        let before_tests = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code = before_tests
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"));
        code.collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn no_layer_uses_one_above_it() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let module = |entry: &str| entry.trim_end_matches(".rs").to_owned();
        let mut found = Vec::new();
        for (level, layer) in LAYERS.iter().enumerate() {
            let above: Vec<String> = LAYERS[level + 1..]
                .iter()
                .flat_map(|l| l.iter())
                .map(|entry| format!("crate::{}", module(entry)))
                .collect();
            for entry in layer.iter() {
                let mut files = Vec::new();
                sources(&src.join(entry), &mut files);
                for file in files {
                    let code = code_of(&file);
                    for upper in above.iter().filter(|u| code.contains(u.as_str())) {
                        found.push(format!("{} uses {upper}", file.display()));
                    }
                }
            }
        }
        // Within the store: the EtcdStore and the TCPStore's parts below
        // its server know nothing of the server.
        for lower in ["store/etcd", "store/tcp/protocol.rs", "store/tcp/parser.rs"] {
            let mut files = Vec::new();
            sources(&src.join(lower), &mut files);
            for file in files {
                if code_of(&file).contains("tcp::server") {
                    found.push(format!("{} uses the TCPStore server", file.display()));
                }
            }
        }
        assert!(found.is_empty(), "{found:#?}");
    }
}
