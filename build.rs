//! Generates include/distcore.h from the `extern "C"` functions in src/ffi
//! (the header is committed; the test command fails when it is stale), with
//! the status codes' `DC_OK` / `DC_ERR_*` taken from `src/error.rs`'s
//! `Status` enum (their one table; the same constants reach the Rust side of
//! the ABI through `$OUT_DIR/status_codes.rs`), and gives the shared library
//! its SONAME.

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
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    let error_rs = std::fs::read_to_string(crate_dir.join("src").join("error.rs"))
        .expect("src/error.rs is readable");
    let codes = status_codes(&error_rs);
    config.after_includes = Some(c_defines(&codes).trim_end().to_owned());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    std::fs::write(out_dir.join("status_codes.rs"), rust_consts(&codes))
        .expect("OUT_DIR is writable");
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

/// The status codes of `src/error.rs`'s `Status` enum, the one table of
/// them: each variant's doc comment, name and number.
struct StatusCode {
    doc: Vec<String>,
    name: String,
    value: String,
}

/// Reads the `Status` enum's variants from `src/error.rs` (doc comments
/// with `///`, one `Name = number,` per variant).
fn status_codes(error_rs: &str) -> Vec<StatusCode> {
    let body = error_rs
        .split_once("pub enum Status {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .map(|(body, _)| body)
        .expect("src/error.rs defines `pub enum Status { ... }`");
    let mut codes = Vec::new();
    let mut doc = Vec::new();
    for line in body.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_owned());
        } else if let Some((name, value)) = line.trim_end_matches(',').split_once(" = ") {
            codes.push(StatusCode {
                doc: std::mem::take(&mut doc),
                name: name.trim().to_owned(),
                value: value.trim().to_owned(),
            });
        }
    }
    assert!(!codes.is_empty(), "no variants in src/error.rs's Status");
    codes
}

/// `DC_OK` for `Ok`, `DC_ERR_INVALID_ARGUMENT` for `InvalidArgument`.
fn c_name(variant: &str) -> String {
    if variant == "Ok" {
        return "DC_OK".to_owned();
    }
    let mut name = String::from("DC_ERR");
    for c in variant.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The codes as C macros, each with its doc comment.
fn c_defines(codes: &[StatusCode]) -> String {
    let mut out = String::new();
    for code in codes {
        out.push('\n');
        for line in &code.doc {
            out.push_str(&format!("// {line}\n").replace("//  ", "// "));
        }
        out.push_str(&format!("#define {} {}\n", c_name(&code.name), code.value));
    }
    out
}

/// The codes as Rust constants of `dc_status`, for `src/ffi`.
fn rust_consts(codes: &[StatusCode]) -> String {
    let mut out = String::new();
    for code in codes {
        for line in &code.doc {
            out.push_str(&format!("/// {line}\n"));
        }
        out.push_str(&format!(
            "pub const {}: dc_status = {};\n",
            c_name(&code.name),
            code.value
        ));
    }
    out
}
