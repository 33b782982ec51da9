use which::which;

/// Rebuild the eBPF object when bpf-linker changes (as aya-template does): cargo does
/// not track the linker on its own.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
    // Small copies and fills (addresses, MACs, keys) inline as loads and stores:
    // bpf-linker's default (`--bpf-expand-memcpy-in-order`) turns every memmove and
    // memset into a call of a byte-at-a-time subroutine. (Not
    // `+allows-misaligned-mem-access`: LLVM then also misaligns stack slots, which
    // the verifier refuses whatever the CPU.)
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
