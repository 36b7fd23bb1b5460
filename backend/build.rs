//! Links libtpms, located with pkg-config (Debian: libtpms-dev), and
//! sets the vtpmd binary's link layout (idle memory per instance).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Every segment of the daemon starts on a page of its own, so its
    // writable data and bss (3 KiB) take one page per process, not two
    // when the linker's packing makes them straddle a page boundary
    // (docs/PERFORMANCE.md, "Memory per instance"). Layout only: PIE,
    // RELRO and NX stay as they are.
    println!("cargo:rustc-link-arg-bin=vtpmd=-Wl,-z,separate-loadable-segments");
    // Rust's standard library links the shared unwinder (-lgcc_s); the
    // directory holds a linker script of that name that links GCC's
    // static one instead (what gcc -static-libgcc does), so the daemon
    // maps one shared library less: 8 KiB private per idle instance.
    let shim = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("link");
    println!("cargo:rerun-if-changed=link/libgcc_s.so");
    println!("cargo:rustc-link-arg-bin=vtpmd=-L{}", shim.display());
    match std::process::Command::new("pkg-config")
        .args(["--libs-only-L", "--libs-only-l", "libtpms"])
        .output()
    {
        Ok(out) if out.status.success() => {
            for flag in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Some(dir) = flag.strip_prefix("-L") {
                    println!("cargo:rustc-link-search=native={dir}");
                } else if let Some(lib) = flag.strip_prefix("-l") {
                    println!("cargo:rustc-link-lib={lib}");
                }
            }
        }
        _ => panic!(
            "libtpms not found by pkg-config: install it with scripts/install-deps.sh \
             (Debian package libtpms-dev)"
        ),
    }
}
