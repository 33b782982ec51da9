//! Test certificates made at test time with the `openssl` command (installed by
//! `cargo xtask setup`) into a temporary directory removed on drop: a CA, leaf
//! certificates it signs, self-signed ones. ECDSA P-256 keys. For the unit tests
//! and (feature `test-pki`) the lab tests; never part of a release build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::CertificateFiles;

/// A directory of test keys and certificates.
pub struct TestPki {
    dir: PathBuf,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (install it: cargo xtask setup)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestPki {
    /// An empty directory under the system's temp dir.
    pub fn new(tag: &str) -> TestPki {
        let dir = std::env::temp_dir().join(format!(
            "fwd-pki-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the PKI dir");
        TestPki { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new P-256 key in `NAME.key`.
    fn key(&self, name: &str) -> PathBuf {
        let key = format!("{name}.key");
        openssl(
            &self.dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &key,
            ],
        );
        self.dir.join(key)
    }

    /// A CA certificate and key: `NAME.pem`, `NAME.key`.
    pub fn ca(&self, name: &str) -> CertificateFiles {
        let key = self.key(name);
        let cert = format!("{name}.pem");
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-out",
                &cert,
                "-days",
                "3",
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        CertificateFiles {
            cert: self.dir.join(cert),
            key,
        }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), signed by `ca`
    /// or, without one, by its own key: `NAME.pem`, `NAME.key`.
    pub fn leaf(
        &self,
        name: &str,
        names: &[&str],
        ca: Option<&CertificateFiles>,
    ) -> CertificateFiles {
        let key = self.key(name);
        let csr = format!("{name}.csr");
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-out",
                &csr,
                "-subj",
                &format!("/CN={}", names.first().copied().unwrap_or(name)),
            ],
        );
        let sans: Vec<String> = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(_) => format!("IP:{n}"),
                Err(_) => format!("DNS:{n}"),
            })
            .collect();
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .expect("writing the extension file");
        let cert = format!("{name}.pem");
        let mut args = vec![
            "x509", "-req", "-in", &csr, "-out", &cert, "-days", "3", "-extfile", &ext,
        ];
        let (ca_cert, ca_key);
        match ca {
            Some(ca) => {
                ca_cert = ca.cert.display().to_string();
                ca_key = ca.key.display().to_string();
                args.extend(["-CA", &ca_cert, "-CAkey", &ca_key, "-CAcreateserial"]);
            }
            None => {
                ca_key = self.dir.join(format!("{name}.key")).display().to_string();
                args.extend(["-signkey", &ca_key]);
            }
        }
        openssl(&self.dir, &args);
        CertificateFiles {
            cert: self.dir.join(cert),
            key,
        }
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
