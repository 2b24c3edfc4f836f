// Link the drover binary as a non-PIE executable: its internal pointers
// are then fixed at link time rather than relocated at every start, so
// the pages holding them stay clean and shared, and the supervisor's
// resident memory stays small.
//
// On x86_64 Linux (linked by rust-lld since Rust 1.90), the functions the
// running supervisor executes after start-up (link/hot-code.txt, made by
// link/profile-hot-code.sh) are laid out together: drover drops its code
// pages once started, and the few it faults back in then sit side by side
// instead of across the whole binary.
fn main() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-no-pie");
    if var("CARGO_CFG_TARGET_ENV") == "gnu" {
        // The unwinder from libgcc_eh.a, linked in, instead of libgcc_s.so:
        // link/static-libgcc/libgcc_s.so is a linker script the linker
        // finds first. The shared library's constructor probes the CPU
        // (cpuid, slow in a VM: a seventh of a millisecond at every
        // command's start).
        let libgcc = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/static-libgcc");
        println!("cargo:rustc-link-search=native={}", libgcc.display());
    }
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/hot-code.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    if var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && lld_links()
        && order.is_file()
    {
        println!("cargo:rustc-link-arg-bin=drover=-Wl,--symbol-ordering-file={}", order.display());
        // Symbols of another build (debug, other dependencies) are absent.
        println!("cargo:rustc-link-arg-bin=drover=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether rustc links with its own lld: its default for x86_64 Linux from
/// 1.90 on, unless a linker of the user's is set.
fn lld_links() -> bool {
    let chosen = ["CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER", "RUSTC_LINKER"];
    if chosen.iter().any(|k| std::env::var_os(k).is_some()) {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("--version").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    // "rustc 1.95.0 (…)"
    let minor =
        text.split_whitespace().nth(1).and_then(|v| v.split('.').nth(1)).and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
