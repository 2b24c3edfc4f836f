// Link the drover binary as a non-PIE executable: its internal pointers
// are then fixed at link time rather than relocated at every start, so
// the pages holding them stay clean and shared, and the supervisor's
// resident memory stays small.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
