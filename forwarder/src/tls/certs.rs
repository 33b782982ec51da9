//! Reading PEM certificate chains, private keys and CA bundles, and telling when
//! the files changed (for the reload without restart).

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::provider;
use crate::config::CertificateFiles;

/// Where the system's CA store is looked for when `tls_origin_ca` is not given
/// (Debian/Ubuntu first; then Fedora/RHEL, openSUSE, Alpine/BSD-style).
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Which file of a certificate entry a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhichFile {
    Cert,
    Key,
}

impl WhichFile {
    /// The key's name in a `tls_certificates` entry.
    pub fn as_str(self) -> &'static str {
        match self {
            WhichFile::Cert => "cert",
            WhichFile::Key => "key",
        }
    }
}

/// Why a certificate entry cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub file: WhichFile,
    pub reason: String,
}

fn read(path: &Path, file: WhichFile) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|error| FileError {
        file,
        reason: format!("cannot read {}: {error}", path.display()),
    })
}

/// Reads a certificate chain and its key into the form rustls serves, checking
/// that the first certificate parses and that the key belongs to it.
pub fn load_certificate(files: &CertificateFiles) -> Result<Arc<CertifiedKey>, FileError> {
    let cert_error = |reason: String| FileError {
        file: WhichFile::Cert,
        reason,
    };
    let key_error = |reason: String| FileError {
        file: WhichFile::Key,
        reason,
    };
    let cert_pem = read(&files.cert, WhichFile::Cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(format!("{}: not PEM: {e}", files.cert.display())))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_error(format!(
            "{} holds no PEM CERTIFICATE block",
            files.cert.display()
        )));
    };
    webpki::EndEntityCert::try_from(leaf).map_err(|e| {
        cert_error(format!(
            "{}: the first certificate is not a usable X.509 certificate: {e}",
            files.cert.display()
        ))
    })?;
    let key_pem = read(&files.key, WhichFile::Key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        key_error(format!(
            "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            files.key.display()
        ))
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(format!("{}: unusable key: {e}", files.key.display())))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // The key type cannot tell its public key: nothing to compare.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(key_error(format!(
                "{} is not the key of the certificate in {}",
                files.key.display(),
                files.cert.display()
            )));
        }
    }
    Ok(Arc::new(certified))
}

/// The CA certificates the origin's certificate is validated against: `path`,
/// else the first of [`SYSTEM_CA_BUNDLES`] that exists.
pub fn load_roots(path: Option<&Path>) -> Result<Arc<RootCertStore>, String> {
    let path: PathBuf = match path {
        Some(path) => path.to_path_buf(),
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "no system CA store found (looked for {}); install ca-certificates or \
                     name a bundle in tls_origin_ca",
                    SYSTEM_CA_BUNDLES.join(", ")
                )
            })?,
    };
    let pem = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{} holds no usable CA certificate", path.display()));
    }
    Ok(Arc::new(roots))
}

/// What a file looked like when it was read: a change of any part means it was
/// replaced or rewritten (the path is followed through symlinks, so a symlink
/// swapped to a new file counts too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: (u64, u64),
}

impl FileStamp {
    /// `None` when the file cannot be read now (then a change is noticed when it
    /// comes back).
    pub fn of(path: &Path) -> Option<FileStamp> {
        let meta = fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: (meta.dev(), meta.ino()),
        })
    }
}

/// The stamps of every certificate and key file of an entry list, in order.
pub fn stamps(certificates: &[CertificateFiles]) -> Vec<Option<FileStamp>> {
    certificates
        .iter()
        .flat_map(|files| [FileStamp::of(&files.cert), FileStamp::of(&files.key)])
        .collect()
}
