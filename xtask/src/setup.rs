//! `cargo xtask setup`: everything a fresh Debian machine (or CI) needs before the
//! project builds and its lab tests run. Idempotent, and quick when nothing is missing.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{command, home_dir, is_root, note, output, run, step, warn};

/// The bpf-linker release this project builds its eBPF object with.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the lab, the demo and the benchmarks use.
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "ethtool",
    "nftables",
    "nginx-light",
    "libnginx-mod-stream",
    "haproxy",
    "vsftpd",
    "iperf3",
    "dnsutils",
    "dnsmasq",
    "curl",
    // TLS termination tests: test certificates, `openssl s_client`, the default CA store.
    "openssl",
    "ca-certificates",
    "lftp",
    "hping3",
    "socat",
    "netsniff-ng",
    "xdp-tools",
    "bpftool",
    "procps",
    // The package test (`systemd-analyze verify`) and the system-call filter test.
    "systemd",
    "strace",
    // The fleet lab's BGP daemons (router and edges), with BFD.
    "bird2",
];

/// Services Debian starts when their package is installed; the tests run their own
/// instances inside namespaces, so the host's copies must not hold ports 80/21/53.
const SERVICES: &[(&str, &[&str])] = &[
    ("nginx", &["/run/nginx.pid"]),
    ("haproxy", &["/run/haproxy.pid"]),
    ("vsftpd", &["/run/vsftpd.pid", "/run/vsftpd/vsftpd.pid"]),
    ("dnsmasq", &["/run/dnsmasq/dnsmasq.pid", "/run/dnsmasq.pid"]),
    // The fleet lab runs its own BIRDs in namespaces; the host's must not speak BGP.
    ("bird", &["/run/bird/bird.pid"]),
];

pub fn setup() -> Result<()> {
    step("setup: checking the toolchains, bpf-linker, system packages and the kernel");
    rust_src().context(
        "setup step 1/4 (rust-src for the nightly toolchain) failed; fix: \
         `rustup component add rust-src --toolchain nightly` (the nightly toolchain must be \
         installed: `rustup toolchain list`)",
    )?;
    bpf_linker().context(
        "setup step 2/4 (bpf-linker) failed; fix: see docs/xtask.md, \"bpf-linker\": it must be \
         built against the nightly toolchain's own libLLVM",
    )?;
    packages().context(
        "setup step 3/4 (Debian packages) failed; fix: run as root on Debian/Ubuntu, check \
         that apt can reach its mirror, or install the packages listed above by hand",
    )?;
    kernel();
    step("setup: done");
    Ok(())
}

/// `rustc +nightly --print sysroot`.
pub fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(command("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context(
            "the nightly toolchain is not usable (is it installed? `rustup toolchain list`)",
        )?;
    Ok(PathBuf::from(out))
}

fn rust_src() -> Result<()> {
    step("setup 1/4: rust-src component for the nightly toolchain (eBPF build-std)");
    let sysroot = nightly_sysroot()?;
    let library = sysroot.join("lib/rustlib/src/rust/library");
    if library.is_dir() {
        note(format!("already present: {}", library.display()));
        return Ok(());
    }
    run(command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Runs `bpf-linker --version`; `None` if it is missing or does not start (for example
/// when the libLLVM it was linked against is gone after a nightly update).
fn bpf_linker_version() -> Option<String> {
    output(command("bpf-linker").arg("--version")).ok()
}

/// `bpf-linker 0.13.0` → true for the wanted version.
pub fn is_wanted_bpf_linker(version_output: &str) -> bool {
    version_output
        .split_whitespace()
        .any(|w| w == BPF_LINKER_VERSION)
}

fn bpf_linker() -> Result<()> {
    step(format!(
        "setup 2/4: bpf-linker {BPF_LINKER_VERSION} built against the nightly's libLLVM"
    ));
    match bpf_linker_version() {
        Some(v) if is_wanted_bpf_linker(&v) => {
            note(format!("already installed: {v}"));
            return Ok(());
        }
        Some(v) => note(format!(
            "found `{v}`, want {BPF_LINKER_VERSION}: reinstalling"
        )),
        None => note("bpf-linker is not installed (or does not start): installing"),
    }

    let sysroot_lib = nightly_sysroot()?.join("lib");
    let prefix = home_dir()?.join(".local/share/forwarder/llvm");
    let llvm = link_llvm_prefix(&prefix, &sysroot_lib)?;
    note(format!(
        "LLVM prefix {} -> {}",
        prefix.display(),
        llvm.path.display()
    ));
    let feature = format!("llvm-{}", llvm.major);
    let mut cmd = command("cargo");
    cmd.env("LLVM_PREFIX", &prefix)
        // Build outside the workspace so that its .cargo/config.toml does not apply.
        .current_dir(&prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--no-default-features", "--features", &feature])
        // Replaces a broken install of the same version (e.g. libLLVM gone).
        .arg("--force");
    run(&mut cmd)?;
    match bpf_linker_version() {
        Some(v) if is_wanted_bpf_linker(&v) => {
            note(format!("installed: {v}"));
            Ok(())
        }
        Some(v) => bail!("after the install `bpf-linker --version` reports `{v}`"),
        None => {
            bail!("bpf-linker was installed but does not run; is cargo's bin directory on PATH?")
        }
    }
}

/// The nightly's shared libLLVM, as found in its sysroot.
#[derive(Debug, PartialEq, Eq)]
pub struct NightlyLlvm {
    /// Full path of `libLLVM.so.<ver>-rust-<rustver>-nightly` in the sysroot.
    pub path: PathBuf,
    /// File name, which is also the soname bpf-linker links against.
    pub file_name: String,
    /// LLVM major version, for bpf-linker's `llvm-<major>` feature.
    pub major: u32,
}

/// Picks the file matching `libLLVM.so.*-rust-*-nightly` among `names`; the highest
/// if several. Returns `(file name, LLVM major version)`.
pub fn pick_llvm_lib<I, S>(names: I) -> Option<(String, u32)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    names
        .into_iter()
        .filter_map(|n| {
            let n = n.as_ref();
            let rest = n.strip_prefix("libLLVM.so.")?;
            let (version, toolchain) = rest.split_once("-rust-")?;
            if !toolchain.ends_with("-nightly") || toolchain.len() <= "-nightly".len() {
                return None;
            }
            let major = version.split('.').next()?.parse().ok()?;
            Some((n.to_string(), major))
        })
        .max()
}

/// Finds the nightly's libLLVM in `sysroot_lib`.
pub fn find_nightly_llvm(sysroot_lib: &Path) -> Result<NightlyLlvm> {
    let entries =
        fs::read_dir(sysroot_lib).with_context(|| format!("reading {}", sysroot_lib.display()))?;
    let names = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok());
    let (file_name, major) = pick_llvm_lib(names).ok_or_else(|| {
        anyhow!(
            "no libLLVM.so.*-rust-*-nightly in {} (is this a nightly toolchain with a shared LLVM?)",
            sysroot_lib.display()
        )
    })?;
    Ok(NightlyLlvm {
        path: sysroot_lib.join(&file_name),
        file_name,
        major,
    })
}

/// Makes `<prefix>/lib/{libLLVM.so, <soname>}` symlinks to the nightly's libLLVM, so
/// `LLVM_PREFIX=<prefix>` lets bpf-linker's build link against it. Existing links that
/// point elsewhere are replaced; correct ones are left alone.
pub fn link_llvm_prefix(prefix: &Path, sysroot_lib: &Path) -> Result<NightlyLlvm> {
    let llvm = find_nightly_llvm(sysroot_lib)?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm.file_name.as_str()] {
        let link = lib.join(name);
        match fs::read_link(&link) {
            Ok(target) if target == llvm.path => continue,
            Ok(_) => fs::remove_file(&link),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Exists but is not a symlink.
            Err(_) => fs::remove_file(&link),
        }
        .with_context(|| format!("removing stale {}", link.display()))?;
        std::os::unix::fs::symlink(&llvm.path, &link)
            .with_context(|| format!("symlinking {} -> {}", link.display(), llvm.path.display()))?;
    }
    Ok(llvm)
}

/// From `dpkg-query -W -f='${Package} ${Status}\n' pkgs...` output, the wanted packages
/// that are not fully installed (unknown ones print nothing on stdout).
pub fn missing_packages<'a>(wanted: &[&'a str], dpkg_output: &str) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|pkg| {
            !dpkg_output.lines().any(|line| {
                line.split_once(' ').is_some_and(|(name, status)| {
                    name == *pkg && status.trim() == "install ok installed"
                })
            })
        })
        .collect()
}

fn packages() -> Result<()> {
    step("setup 3/4: Debian packages for the test lab");
    // Exits 1 when some package is unknown to dpkg; the output still lists the others.
    let out = command("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(PACKAGES)
        .output()
        .context("could not run dpkg-query: this setup supports Debian/Ubuntu only")?;
    let missing = missing_packages(PACKAGES, &String::from_utf8_lossy(&out.stdout));
    if missing.is_empty() {
        note(format!("all {} packages installed", PACKAGES.len()));
        return Ok(());
    }
    note(format!("missing: {}", missing.join(" ")));
    if !is_root() {
        bail!(
            "installing packages needs root; run as root: apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
    }
    run(command("apt-get")
        .args(["update"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // Keep Debian's maintainer scripts from starting services while we install.
    let policy = PolicyRcGuard::install();
    let mut cmd = command("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .env("NEEDRESTART_MODE", "a")
        .args(["install", "-y", "--no-install-recommends"])
        .args([
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ])
        .args(&missing);
    let result = run(&mut cmd);
    drop(policy);
    result?;
    stop_services();
    Ok(())
}

/// A temporary `/usr/sbin/policy-rc.d` that answers 101 ("action forbidden"), so that
/// `invoke-rc.d`/`deb-systemd-invoke` do not start services while packages install.
/// Only created if none exists; removed on drop.
struct PolicyRcGuard(Option<PathBuf>);

impl PolicyRcGuard {
    fn install() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Self(None);
        }
        let written = fs::write(
            &path,
            "#!/bin/sh\n# written by cargo xtask setup\nexit 101\n",
        )
        .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)));
        match written {
            Ok(()) => Self(Some(path)),
            Err(e) => {
                warn(format!("could not write {}: {e}", path.display()));
                Self(None)
            }
        }
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// Stops (and disables, where systemd works) the services the packages may have
/// started; failures are ignored: the service may simply not be running.
fn stop_services() {
    step("setup 3/4: stopping services the packages may have started (ports 80/21/53)");
    for (service, pidfiles) in SERVICES {
        let quiet = |cmd: &mut Command| {
            let _ = cmd
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        quiet(command("systemctl").args(["disable", "--now", service]));
        quiet(command("service").args([service, "stop"]));
        for pidfile in *pidfiles {
            if let Ok(pid) = fs::read_to_string(pidfile) {
                let pid = pid.trim();
                if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                    quiet(command("kill").arg(pid));
                }
            }
        }
        note(format!("{service}: stopped (if it was running)"));
    }
}

fn kernel() {
    step("setup 4/4: kernel support and privileges");
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    note(format!("kernel {}", release.trim()));
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        note("BTF: /sys/kernel/btf/vmlinux present");
    } else {
        warn(
            "/sys/kernel/btf/vmlinux is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); \
             loading the datapath may fail",
        );
    }
    if is_root() {
        note("running as root");
    } else {
        warn(
            "not running as root: `forwarder run`, the demo, the benchmarks and the \
             integration tests need root (network namespaces, XDP)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_packages_from_dpkg_output() {
        let out = "iproute2 install ok installed\n\
                   nginx-light deinstall ok config-files\n\
                   curl install ok installed\n";
        let wanted = ["iproute2", "nginx-light", "curl", "haproxy"];
        assert_eq!(missing_packages(&wanted, out), ["nginx-light", "haproxy"]);
        assert!(missing_packages(&["curl"], out).is_empty());
        assert_eq!(missing_packages(&["curl"], ""), ["curl"]);
        // A name that is a prefix of another does not count.
        assert_eq!(missing_packages(&["iproute"], out), ["iproute"]);
    }

    #[test]
    fn bpf_linker_version_check() {
        assert!(is_wanted_bpf_linker("bpf-linker 0.13.0"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.9.15"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.13.01"));
        assert!(!is_wanted_bpf_linker(""));
    }

    #[test]
    fn picks_nightly_llvm_by_pattern() {
        let names = [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "libLLVM.so.19.1-rust-1.84.0-stable",
            "rustlib",
        ];
        assert_eq!(
            pick_llvm_lib(names),
            Some(("libLLVM.so.22.1-rust-1.97.0-nightly".to_string(), 22))
        );
        assert_eq!(pick_llvm_lib(["libLLVM.so.22.1-rust--nightly"]), None);
        assert_eq!(pick_llvm_lib(["libLLVM.so"]), None);
    }

    /// A unique, self-removing temporary directory.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir =
                std::env::temp_dir().join(format!("xtask-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn llvm_prefix_symlinks() {
        let tmp = TempDir::new("llvm");
        let sysroot_lib = tmp.0.join("sysroot/lib");
        fs::create_dir_all(&sysroot_lib).unwrap();
        let soname = "libLLVM.so.22.1-rust-1.97.0-nightly";
        fs::write(sysroot_lib.join(soname), b"elf").unwrap();
        fs::write(
            sysroot_lib.join("libLLVM-22-rust-1.97.0-nightly.so"),
            b"elf",
        )
        .unwrap();
        let prefix = tmp.0.join("prefix");
        let expected = sysroot_lib.join(soname);

        let check = || {
            for name in ["libLLVM.so", soname] {
                let link = prefix.join("lib").join(name);
                assert_eq!(fs::read_link(&link).unwrap(), expected, "{name}");
                assert_eq!(fs::read(&link).unwrap(), b"elf");
            }
            let mut names: Vec<_> = fs::read_dir(prefix.join("lib"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["libLLVM.so", soname]);
        };

        let llvm = link_llvm_prefix(&prefix, &sysroot_lib).unwrap();
        assert_eq!(llvm.file_name, soname);
        assert_eq!(llvm.major, 22);
        assert_eq!(llvm.path, expected);
        check();

        // Idempotent.
        link_llvm_prefix(&prefix, &sysroot_lib).unwrap();
        check();

        // A stale link (older nightly) and a plain file are replaced.
        fs::remove_file(prefix.join("lib/libLLVM.so")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/libLLVM.so.21", prefix.join("lib/libLLVM.so"))
            .unwrap();
        fs::remove_file(prefix.join("lib").join(soname)).unwrap();
        fs::write(prefix.join("lib").join(soname), b"junk").unwrap();
        link_llvm_prefix(&prefix, &sysroot_lib).unwrap();
        check();
    }

    #[test]
    fn llvm_prefix_errors_without_nightly_llvm() {
        let tmp = TempDir::new("nollvm");
        let err = link_llvm_prefix(&tmp.0.join("prefix"), &tmp.0).unwrap_err();
        assert!(format!("{err:#}").contains("no libLLVM.so"), "{err:#}");
    }
}
