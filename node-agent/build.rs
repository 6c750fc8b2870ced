//! Builds the eBPF programs (ebpf/programs, nightly + bpf-linker) and hands the object to
//! the crate as `$OUT_DIR/skiff-ebpf.o`, embedded with `aya::include_bytes_aligned!`.
//! This is what aya-build does, with skiff's own toolchain checks: when nightly, rust-src
//! or bpf-linker are missing the build fails with "run `cargo xtask setup`".
//!
//! `SKIFF_EBPF_OBJECT=/path/to/object` skips the build and embeds that file instead.

#[path = "../ebpf/build_support.rs"]
mod build_support;

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("skiff-ebpf.o");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SKIFF_EBPF_OBJECT");

    let object = match env::var_os("SKIFF_EBPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            path
        }
        None => {
            for input in build_support::inputs(&ebpf_dir) {
                println!("cargo:rerun-if-changed={}", input.display());
            }
            match build_support::build(&ebpf_dir, true) {
                Ok(object) => object,
                Err(e) => {
                    eprintln!("error: {e}");
                    panic!("skiff-agent: cannot build the eBPF object: {e}");
                }
            }
        }
    };
    if let Err(e) = fs::copy(&object, &out) {
        panic!(
            "skiff-agent: cannot copy eBPF object {} to {}: {e}; run `cargo xtask build-ebpf`",
            object.display(),
            out.display()
        );
    }
}
