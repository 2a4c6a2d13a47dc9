//! Generates include/distcore.h from the `extern "C"` functions in src/ffi
//! (the header is committed; the test command fails when it is stale), and
//! gives the shared library its SONAME.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    // The shared library's SONAME: programs record libdistcore.so.MAJOR, so
    // any library of the same major version (same ABI, maybe grown) serves
    // them, and a new major version installs next to the old one.
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets it");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libdistcore.so.{major}");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    let header = crate_dir.join("include").join("distcore.h");
    match cbindgen::generate_with_config(&crate_dir, config) {
        // write_to_file leaves the file untouched when nothing changed.
        Ok(bindings) => {
            bindings.write_to_file(&header);
        }
        // A syntax error in src is reported by rustc itself, with context.
        Err(e) => println!("cargo:warning=cbindgen could not generate the header: {e}"),
    }
}
