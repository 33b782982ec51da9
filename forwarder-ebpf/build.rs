use which::which;

/// Rebuild the eBPF object when bpf-linker changes (as aya-template does): cargo does
/// not track the linker on its own.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
}
