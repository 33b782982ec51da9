//! `cargo xtask dist`: a Debian package of the release build, made with
//! `dpkg-deb` from a staging tree (no packaging crate needed):
//!
//! | path | from |
//! | --- | --- |
//! | `/usr/bin/forwarder` | the release binary (eBPF object embedded) |
//! | `/lib/systemd/system/forwarder.service` | `examples/forwarder.service`, `/usr/local/bin` → `/usr/bin` |
//! | `/etc/forwarder/forwarder.toml` | `examples/forwarder.toml` (a conffile) |
//! | `/etc/logrotate.d/forwarder` | `examples/forwarder.logrotate` (a conffile) |
//! | `/usr/share/man/man1/forwarder*.1.gz` | `forwarder generate man` |
//! | bash, zsh, fish completions | `forwarder generate completions` |
//! | `/usr/share/doc/forwarder/` | README, docs, `copyright` (the licences), the Grafana dashboard and alert rules |

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, command, note, run, step};

/// The package's name, and the files it owns besides the binary.
const PACKAGE: &str = "forwarder";

/// Builds `target/dist/forwarder_VERSION_ARCH.deb` and returns its path.
pub fn dist() -> Result<PathBuf> {
    crate::build()?;
    let root = util::workspace_root();
    let bin = util::forwarder_bin();
    let version = package_version(&root)?;
    let arch = dpkg_architecture()?;
    let dist = root.join("target/dist");
    let stage = dist.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    step(format!("dist: staging {}", stage.display()));
    let put = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dest = stage.join(to.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(from, &dest)
            .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put(&bin, "/usr/bin/forwarder", 0o755)?;
    let unit = std::fs::read_to_string(root.join("examples/forwarder.service"))?
        .replace("/usr/local/bin/forwarder", "/usr/bin/forwarder");
    write(
        &stage,
        "/lib/systemd/system/forwarder.service",
        &unit,
        0o644,
    )?;
    put(
        &root.join("examples/forwarder.toml"),
        "/etc/forwarder/forwarder.toml",
        0o644,
    )?;
    put(
        &root.join("examples/forwarder.logrotate"),
        "/etc/logrotate.d/forwarder",
        0o644,
    )?;
    // Man pages and completions, from the binary itself.
    let generated = dist.join("generated");
    let _ = std::fs::remove_dir_all(&generated);
    for what in ["man", "completions"] {
        run(command(&bin)
            .args(["generate", what])
            .arg(generated.join(what)))
        .with_context(|| format!("forwarder generate {what}"))?;
    }
    for page in std::fs::read_dir(generated.join("man"))? {
        let page = page?.path();
        let name = page
            .file_name()
            .context("page name")?
            .to_string_lossy()
            .into_owned();
        let dest = format!("/usr/share/man/man1/{name}");
        put(&page, &dest, 0o644)?;
        run(command("gzip")
            .args(["-9n"])
            .arg(stage.join(dest.trim_start_matches('/'))))?;
    }
    let completions = generated.join("completions");
    put(
        &completions.join("forwarder.bash"),
        "/usr/share/bash-completion/completions/forwarder",
        0o644,
    )?;
    put(
        &completions.join("_forwarder"),
        "/usr/share/zsh/vendor-completions/_forwarder",
        0o644,
    )?;
    put(
        &completions.join("forwarder.fish"),
        "/usr/share/fish/vendor_completions.d/forwarder.fish",
        0o644,
    )?;
    // Documentation: the README, every doc, the licences.
    let doc = "/usr/share/doc/forwarder";
    put(&root.join("README.md"), &format!("{doc}/README.md"), 0o644)?;
    for entry in std::fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path
                .file_name()
                .context("doc name")?
                .to_string_lossy()
                .into_owned();
            put(&path, &format!("{doc}/{name}"), 0o644)?;
        }
    }
    for example in ["grafana-dashboard.json", "prometheus-alerts.yml"] {
        put(
            &root.join("examples").join(example),
            &format!("{doc}/examples/{example}"),
            0o644,
        )?;
    }
    let copyright = format!(
        "forwarder {version}\n\nThe userspace agent is licensed under the MIT license or the Apache \
         License 2.0, at your option; the eBPF programs it loads are dual MIT/GPL-2.0 (the kernel \
         needs a GPL-compatible licence for some helpers).\n\n{}\n\n{}",
        std::fs::read_to_string(root.join("LICENSE-MIT"))?,
        std::fs::read_to_string(root.join("LICENSE-APACHE"))?
    );
    write(&stage, &format!("{doc}/copyright"), &copyright, 0o644)?;
    // Control files.
    let installed_kib = du_kib(&stage)?;
    write(
        &stage,
        "/DEBIAN/control",
        &format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: forwarder developers <forwarder@localhost>\n\
             Installed-Size: {installed_kib}\n\
             Depends: libc6\n\
             Recommends: logrotate\n\
             Section: net\n\
             Priority: optional\n\
             Description: kernel-bypass TCP/UDP reverse proxy (XDP + sk_lookup)\n \
             An XDP program drops what no app asked for and forwards UDP apps at line\n \
             rate (Simple Proxy Protocol, PROXY v2, NAT); a userspace agent turns an app\n \
             config into BPF maps and proxies TCP apps (PROXY v1/v2).\n"
        ),
        0o644,
    )?;
    write(
        &stage,
        "/DEBIAN/conffiles",
        "/etc/forwarder/forwarder.toml\n/etc/logrotate.d/forwarder\n",
        0o644,
    )?;
    write(
        &stage,
        "/DEBIAN/postinst",
        "#!/bin/sh\nset -e\n# The unit is installed, not enabled: the example config names eth0.\n\
         if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n",
        0o755,
    )?;
    let deb = dist.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    run(command("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb))
    .context("dpkg-deb --build")?;
    note(format!("package: {}", deb.display()));
    Ok(deb)
}

fn write(stage: &Path, to: &str, text: &str, mode: u32) -> Result<()> {
    let dest = stage.join(to.trim_start_matches('/'));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The `forwarder` package version from its manifest.
fn package_version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("forwarder/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no version in forwarder/Cargo.toml")
}

fn dpkg_architecture() -> Result<String> {
    let out = command("dpkg")
        .arg("--print-architecture")
        .output()
        .context("dpkg --print-architecture")?;
    if !out.status.success() {
        bail!("dpkg --print-architecture failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The staging tree's size in KiB (`Installed-Size`).
fn du_kib(dir: &Path) -> Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), total)?;
            } else {
                *total += meta.len();
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(dir, &mut total)?;
    Ok(total.div_ceil(1024))
}
