use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::buf::*;
use super::store::*;
use super::work::*;
use super::*;
use crate::store::Store;

fn last_error() -> String {
    // SAFETY: dc_last_error_message never returns NULL.
    unsafe { CStr::from_ptr(dc_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// A store whose every call panics, to prove the boundary contains panics.
struct PanickingStore;

impl Store for PanickingStore {
    fn set(&self, _: &str, _: &[u8]) -> Result<()> {
        panic!("set exploded")
    }
    fn get(&self, _: &str) -> Result<Vec<u8>> {
        panic!("get exploded")
    }
    fn add(&self, _: &str, _: i64) -> Result<i64> {
        unreachable!()
    }
    fn compare_set(&self, _: &str, _: &[u8], _: &[u8]) -> Result<Vec<u8>> {
        unreachable!()
    }
    fn delete_key(&self, _: &str) -> Result<bool> {
        unreachable!()
    }
    fn check(&self, _: &[&str]) -> Result<bool> {
        unreachable!()
    }
    fn wait(&self, _: &[&str], _: Option<Duration>) -> Result<()> {
        unreachable!()
    }
    fn num_keys(&self) -> Result<i64> {
        unreachable!()
    }
    fn append(&self, _: &str, _: &[u8]) -> Result<()> {
        unreachable!()
    }
    fn multi_get(&self, _: &[&str]) -> Result<Vec<Vec<u8>>> {
        unreachable!()
    }
    fn multi_set(&self, _: &[&str], _: &[&[u8]]) -> Result<()> {
        unreachable!()
    }
    fn queue_push(&self, _: &str, _: &[u8]) -> Result<()> {
        unreachable!()
    }
    fn queue_pop(&self, _: &str, _: bool) -> Result<Vec<u8>> {
        unreachable!()
    }
    fn queue_len(&self, _: &str) -> Result<i64> {
        unreachable!()
    }
    fn list_keys(&self) -> Result<Vec<String>> {
        unreachable!()
    }
    fn barrier(&self, _: &str, _: i64, _: Option<Duration>) -> Result<()> {
        unreachable!()
    }
    fn timeout(&self) -> Duration {
        Duration::ZERO
    }
    fn set_timeout(&self, _: Duration) {}
    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        unreachable!()
    }
}

#[test]
fn a_panic_inside_an_extern_function_is_internal_with_a_message() {
    let store = dc_store::new(Arc::new(PanickingStore));
    let status = unsafe { dc_store_set(&store, c"k".as_ptr(), ptr::null(), 0) };
    assert_eq!(status, DC_ERR_INTERNAL);
    assert_eq!(last_error(), "panic in dc_store_set: set exploded");
    let mut buf = dc_buf {
        data: ptr::null_mut(),
        len: 0,
    };
    assert_eq!(
        unsafe { dc_store_get(&store, c"k".as_ptr(), &mut buf) },
        DC_ERR_INTERNAL
    );
    assert!(buf.data.is_null());
}

#[test]
fn null_arguments_are_invalid_not_crashes() {
    let mut store = ptr::null_mut();
    assert_eq!(
        unsafe { dc_hash_store_new(ptr::null_mut()) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert_eq!(last_error(), "out must not be NULL");
    assert_eq!(unsafe { dc_hash_store_new(&mut store) }, DC_OK);
    assert_eq!(
        unsafe { dc_store_set(ptr::null(), c"k".as_ptr(), ptr::null(), 0) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { dc_store_set(store, ptr::null(), ptr::null(), 0) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { dc_store_set(store, c"k".as_ptr(), ptr::null(), 3) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { dc_store_set(store, c"k".as_ptr(), b"x".as_ptr(), usize::MAX) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("DC_MAX_BYTES_LEN"));
    for len in [1usize << 62, (DC_MAX_BYTES_LEN + 1) as usize] {
        assert_eq!(
            unsafe { dc_store_set(store, c"k".as_ptr(), b"x".as_ptr(), len) },
            DC_ERR_INVALID_ARGUMENT
        );
    }
    let bad_utf8 = [0xffu8, 0];
    assert_eq!(
        unsafe { dc_store_set(store, bad_utf8.as_ptr().cast(), ptr::null(), 0) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { dc_store_wait(store, ptr::null(), 0, -5) },
        DC_ERR_INVALID_ARGUMENT
    );
    unsafe { dc_store_free(store) };
    unsafe { dc_store_free(ptr::null_mut()) };
    unsafe { dc_work_free(ptr::null_mut()) };
    unsafe { dc_buf_free(ptr::null_mut()) };
    unsafe { dc_buf_array_free(ptr::null_mut()) };
}

#[test]
fn status_strings_and_version() {
    let s = |c| {
        unsafe { CStr::from_ptr(dc_status_str(c)) }
            .to_str()
            .unwrap()
    };
    assert_eq!(s(DC_ERR_TIMEOUT), "timed out");
    assert_eq!(s(999), "unknown status");
    let v = unsafe { CStr::from_ptr(dc_version()) }.to_str().unwrap();
    assert_eq!(v, crate::VERSION);
}

#[test]
fn bufs_are_nul_terminated_and_freed_once() {
    let mut buf = dc_buf::from_bytes(b"abc");
    assert_eq!(unsafe { *buf.data.add(3) }, 0);
    unsafe { dc_buf_free(&mut buf) };
    assert!(buf.data.is_null());
    unsafe { dc_buf_free(&mut buf) };
    let mut arr = dc_buf_array::from_items(&["a", "bc"]);
    assert_eq!(arr.len, 2);
    unsafe { dc_buf_array_free(&mut arr) };
    assert!(arr.items.is_null());
}

unsafe extern "C" fn count_callback(work: *const dc_work, user_data: *mut c_void) {
    let mut done = false;
    assert_eq!(unsafe { dc_work_is_completed(work, &mut done) }, DC_OK);
    assert!(done);
    unsafe { &*(user_data as *const AtomicUsize) }.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn work_through_the_abi() {
    let mut work = ptr::null_mut();
    assert_eq!(
        unsafe { dc_work_new(0, 999, ptr::null(), -1, &mut work) },
        DC_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        unsafe { dc_work_new(2, 13, ptr::null(), 250, &mut work) },
        DC_OK
    );
    let mut ms = 0;
    assert_eq!(unsafe { dc_work_timeout(work, &mut ms) }, DC_OK);
    assert_eq!(ms, 250);
    let calls = AtomicUsize::new(0);
    let ud = &calls as *const AtomicUsize as *mut c_void;
    assert_eq!(
        unsafe { dc_work_add_done_callback(work, Some(count_callback), ud) },
        DC_OK
    );
    assert_eq!(unsafe { dc_work_wait(work, 10) }, DC_ERR_TIMEOUT);
    assert_eq!(last_error(), "Operation timed out!");
    assert_eq!(unsafe { dc_work_set_source_rank(work, 4) }, DC_OK);
    assert_eq!(
        unsafe { dc_work_finish(work, DC_ERR_REMOTE, c"boom".as_ptr()) },
        DC_OK
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(unsafe { dc_work_wait(work, -1) }, DC_ERR_REMOTE);
    assert_eq!(last_error(), "boom");
    let mut status = 0;
    let mut msg = dc_buf::from_bytes(b"");
    unsafe { dc_buf_free(&mut msg) };
    assert_eq!(unsafe { dc_work_error(work, &mut status, &mut msg) }, DC_OK);
    assert_eq!(status, DC_ERR_REMOTE);
    assert_eq!(
        unsafe { std::slice::from_raw_parts(msg.data, msg.len) },
        b"boom"
    );
    unsafe { dc_buf_free(&mut msg) };
    let mut src = 0;
    assert_eq!(unsafe { dc_work_source_rank(work, &mut src) }, DC_OK);
    assert_eq!(src, 4);
    assert_eq!(
        unsafe { dc_work_finish(work, 77, ptr::null()) },
        DC_ERR_INVALID_ARGUMENT
    );
    unsafe { dc_work_free(work) };
    let name = unsafe { CStr::from_ptr(dc_op_type_name(5)) };
    assert_eq!(name.to_str().unwrap(), "_ALLGATHER_BASE");
    assert!(dc_op_type_name(55).is_null());
}

/// A struct of two releases: `Grown` appended `added` to `Old`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct Grown {
    struct_size: usize,
    old: u32,
    added: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Old {
    struct_size: usize,
    old: u32,
}

// SAFETY: repr(C), usize first, sizes at field ends.
unsafe impl Versioned for Grown {
    const SIZES: &'static [usize] = &[std::mem::size_of::<Old>(), std::mem::size_of::<Grown>()];
    const HOW_TO_SET: &'static str = "call init";
}

#[test]
fn a_versioned_struct_is_read_and_written_as_the_callers_header_knew_it() {
    let defaults = Grown {
        struct_size: std::mem::size_of::<Grown>(),
        old: 1,
        added: 2,
    };
    // An old caller: init writes only its 16 bytes, not past them.
    let mut old = [Old {
        struct_size: 0,
        old: 0,
    }; 2];
    old[1].struct_size = 0xdead;
    let size = std::mem::size_of::<Old>();
    unsafe { write_versioned(old.as_mut_ptr().cast::<Grown>(), "opts", size, defaults) }.unwrap();
    assert_eq!((old[0].struct_size, old[0].old), (size, 1));
    assert_eq!(old[1].struct_size, 0xdead);
    // Reading it back: the added field keeps its default.
    old[0].old = 7;
    let read = unsafe { arg_versioned(old.as_ptr().cast::<Grown>(), "opts", defaults) }.unwrap();
    assert_eq!((read.old, read.added), (7, 2));
    // A size no header had is refused, with how to set it.
    old[0].struct_size = 12;
    let e = unsafe { arg_versioned(old.as_ptr().cast::<Grown>(), "opts", defaults) }.unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(
        e.message().contains("opts->struct_size is 12"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("call init"), "{}", e.message());
}
