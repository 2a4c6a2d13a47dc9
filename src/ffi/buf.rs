//! Bytes handed out to C: `dc_buf` and `dc_buf_array`, owned by the caller.

use std::ptr;

use super::boundary_void;

/// Bytes owned by the caller, released with `dc_buf_free`. `data[len]` is
/// always a NUL byte (not counted in `len`), so text can be printed as is.
/// An empty buffer still has a valid `data`.
#[repr(C)]
pub struct dc_buf {
    /// The bytes, followed by a NUL.
    pub data: *mut u8,
    /// The number of bytes, without the trailing NUL.
    pub len: usize,
}

impl dc_buf {
    /// A buffer holding a copy of `bytes`.
    pub(crate) fn from_bytes(bytes: &[u8]) -> dc_buf {
        let mut owned = Vec::with_capacity(bytes.len() + 1);
        owned.extend_from_slice(bytes);
        owned.push(0);
        let len = bytes.len();
        let data = Box::into_raw(owned.into_boxed_slice()).cast::<u8>();
        dc_buf { data, len }
    }

    /// A buffer taking over `bytes` (no copy when it has room for the NUL).
    pub(crate) fn from_vec(mut bytes: Vec<u8>) -> dc_buf {
        let len = bytes.len();
        bytes.reserve_exact(1);
        bytes.push(0);
        let data = Box::into_raw(bytes.into_boxed_slice()).cast::<u8>();
        dc_buf { data, len }
    }

    /// Releases the bytes, leaving an empty NULL buffer.
    fn release(&mut self) {
        if !self.data.is_null() {
            let slice = ptr::slice_from_raw_parts_mut(self.data, self.len + 1);
            // SAFETY: `data` came from `from_bytes` with `len + 1` bytes.
            drop(unsafe { Box::from_raw(slice) });
        }
        self.data = ptr::null_mut();
        self.len = 0;
    }
}

/// An array of buffers owned by the caller, released with
/// `dc_buf_array_free` (which frees every buffer in it).
#[repr(C)]
pub struct dc_buf_array {
    /// `len` buffers.
    pub items: *mut dc_buf,
    /// The number of buffers.
    pub len: usize,
}

impl dc_buf_array {
    /// An array of copies of `items`.
    pub(crate) fn from_items<T: AsRef<[u8]>>(items: &[T]) -> dc_buf_array {
        let bufs: Box<[dc_buf]> = items
            .iter()
            .map(|i| dc_buf::from_bytes(i.as_ref()))
            .collect();
        let len = bufs.len();
        dc_buf_array {
            items: Box::into_raw(bufs).cast::<dc_buf>(),
            len,
        }
    }
}

/// Frees the bytes of `buf` and sets it to `{NULL, 0}`. NULL, or a buffer
/// already freed, does nothing. Thread-safe for distinct buffers. Never
/// fails or blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_buf_free(buf: *mut dc_buf) {
    boundary_void("dc_buf_free", || {
        // SAFETY: NULL or a valid buffer per the module contract.
        if let Some(buf) = unsafe { buf.as_mut() } {
            buf.release();
        }
    })
}

/// Frees every buffer of `array` and the array, then sets it to `{NULL, 0}`.
/// NULL, or an array already freed, does nothing. Never fails or blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_buf_array_free(array: *mut dc_buf_array) {
    boundary_void("dc_buf_array_free", || {
        // SAFETY: NULL or a valid array per the module contract.
        let Some(array) = (unsafe { array.as_mut() }) else {
            return;
        };
        if !array.items.is_null() {
            let items = ptr::slice_from_raw_parts_mut(array.items, array.len);
            // SAFETY: `items` came from `from_items` with `len` elements.
            let mut items = unsafe { Box::from_raw(items) };
            items.iter_mut().for_each(dc_buf::release);
        }
        array.items = ptr::null_mut();
        array.len = 0;
    })
}
