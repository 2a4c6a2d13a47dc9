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
