//! The TLS keys of a TCP app (Spectrum's Edge TLS Termination): the model, the
//! checks of the text, and the checks of the files they name (`Config::load`
//! reads every certificate, key and CA bundle, so that `check-config` refuses
//! what `run` would refuse). `docs/config.md` documents the keys.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::Problem;
use super::model::{App, Protocol, parse_keyword};
use super::raw::{RawApp, RawCertificate};

/// `tls`: where TLS ends (Spectrum's four modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsMode {
    /// Pass-through: the bytes go to the origin as they came (spliced or copied).
    #[default]
    Off,
    /// TLS between client and edge; plain TCP to the origin.
    Flexible,
    /// TLS on both legs; the origin's certificate is not validated.
    Full,
    /// TLS on both legs; the origin's certificate is validated.
    Strict,
}

impl TlsMode {
    pub const ALL: [TlsMode; 4] = [
        TlsMode::Off,
        TlsMode::Flexible,
        TlsMode::Full,
        TlsMode::Strict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::Flexible => "flexible",
            TlsMode::Full => "full",
            TlsMode::Strict => "strict",
        }
    }

    /// Whether the edge terminates the client's TLS.
    pub fn terminates(self) -> bool {
        self != TlsMode::Off
    }

    /// Whether the origin leg is TLS too.
    pub fn origin_tls(self) -> bool {
        matches!(self, TlsMode::Full | TlsMode::Strict)
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |mode| mode.as_str())
    }
}

/// `min_tls_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

impl TlsVersion {
    pub const ALL: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsVersion {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_keyword(text, &Self::ALL, |version| version.as_str())
    }
}

/// One `tls_certificates` entry: a PEM certificate chain (leaf first) and its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An app's TLS settings; `mode == Off` means none of the rest applies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppTls {
    pub mode: TlsMode,
    /// Chosen by the client's SNI against each certificate's names; the first is
    /// the default (clients without SNI, or with an SNI no certificate has unless
    /// `strict_sni`).
    pub certificates: Vec<CertificateFiles>,
    /// Refuse a client whose SNI matches no certificate (HAProxy's `strict-sni`).
    pub strict_sni: bool,
    pub min_version: TlsVersion,
    /// `strict`: the CA bundle the origin's certificate is validated against
    /// (`None`: the system store, see `tls::certs::SYSTEM_CA_BUNDLES`).
    pub origin_ca: Option<PathBuf>,
    /// `full`/`strict`: the name sent to the origin (SNI) and, for `strict`,
    /// validated against its certificate. `None`: the client's SNI, else the
    /// origin's address.
    pub origin_server_name: Option<String>,
}

/// The TLS keys of an app, as they go back to TOML.
pub(crate) fn raw_tls(tls: &AppTls, raw: &mut RawApp) {
    if tls.mode == TlsMode::Off {
        return;
    }
    let path = |p: &Path| p.display().to_string();
    raw.tls = Some(tls.mode.to_string());
    raw.tls_certificates = Some(
        tls.certificates
            .iter()
            .map(|c| RawCertificate {
                cert: Some(path(&c.cert)),
                key: Some(path(&c.key)),
            })
            .collect(),
    );
    raw.tls_strict_sni = Some(tls.strict_sni);
    raw.min_tls_version = Some(tls.min_version.to_string());
    raw.tls_origin_ca = tls.origin_ca.as_deref().map(path);
    raw.tls_origin_server_name = tls.origin_server_name.clone();
}

/// Checks the TLS keys of one app (the text only); problems go to `problems`.
pub(crate) fn check(
    location: &str,
    raw: &RawApp,
    protocol: Option<Protocol>,
    problems: &mut Vec<Problem>,
) -> AppTls {
    let mut problem = |field: &str, reason: String| {
        problems.push(Problem::new(location, field, reason));
    };
    let mode = match raw.tls.as_deref().map(str::parse::<TlsMode>) {
        None => TlsMode::Off,
        Some(Ok(mode)) => mode,
        Some(Err(reason)) => {
            problem("tls", reason);
            return AppTls::default();
        }
    };
    // Every other key, with whether it is present: none of them means anything
    // without termination, and `tls` itself means nothing on UDP.
    let given: [(&str, bool); 5] = [
        ("tls_certificates", raw.tls_certificates.is_some()),
        ("tls_strict_sni", raw.tls_strict_sni.is_some()),
        ("min_tls_version", raw.min_tls_version.is_some()),
        ("tls_origin_ca", raw.tls_origin_ca.is_some()),
        (
            "tls_origin_server_name",
            raw.tls_origin_server_name.is_some(),
        ),
    ];
    if protocol == Some(Protocol::Udp) {
        if mode != TlsMode::Off {
            problem(
                "tls",
                "TCP apps only: UDP apps are forwarded in XDP, no TLS is terminated".into(),
            );
        }
        for (field, _) in given.iter().filter(|(_, present)| *present) {
            problem(field, "TCP apps only".into());
        }
        return AppTls::default();
    }
    if mode == TlsMode::Off {
        for (field, _) in given.iter().filter(|(_, present)| *present) {
            problem(
                field,
                "only with tls = \"flexible\", \"full\" or \"strict\" (tls is off)".into(),
            );
        }
        return AppTls::default();
    }
    let certificates = match raw.tls_certificates.as_deref() {
        None | Some([]) => {
            problem(
                "tls_certificates",
                format!(
                    "missing; tls = \"{mode}\" needs at least one certificate, e.g. \
                     [{{ cert = \"/etc/forwarder/tls/example.pem\", key = \
                     \"/etc/forwarder/tls/example.key\" }}]"
                ),
            );
            Vec::new()
        }
        Some(entries) => entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| {
                let mut file = |name: &str, value: &Option<String>| match value.as_deref() {
                    Some(text) if !text.trim().is_empty() => Some(PathBuf::from(text)),
                    _ => {
                        problem(
                            &format!("tls_certificates[{index}].{name}"),
                            "missing; the path of a PEM file".into(),
                        );
                        None
                    }
                };
                let cert = file("cert", &entry.cert);
                let key = file("key", &entry.key);
                Some(CertificateFiles {
                    cert: cert?,
                    key: key?,
                })
            })
            .collect(),
    };
    let min_version = match raw.min_tls_version.as_deref().map(str::parse::<TlsVersion>) {
        None => TlsVersion::default(),
        Some(Ok(version)) => version,
        Some(Err(reason)) => {
            problem("min_tls_version", reason);
            TlsVersion::default()
        }
    };
    let origin_ca = match raw.tls_origin_ca.as_deref() {
        None => None,
        Some(_) if mode != TlsMode::Strict => {
            problem(
                "tls_origin_ca",
                format!("only with tls = \"strict\" (tls = \"{mode}\" validates no origin)"),
            );
            None
        }
        Some(text) if text.trim().is_empty() => {
            problem(
                "tls_origin_ca",
                "empty; leave it out for the system's CA store".into(),
            );
            None
        }
        Some(text) => Some(PathBuf::from(text)),
    };
    let origin_server_name = match raw.tls_origin_server_name.as_deref() {
        None => None,
        Some(_) if !mode.origin_tls() => {
            problem(
                "tls_origin_server_name",
                "only with tls = \"full\" or \"strict\" (flexible speaks plain TCP to the origin)"
                    .into(),
            );
            None
        }
        Some(name) => match rustls_pki_types::ServerName::try_from(name) {
            Ok(_) => Some(name.to_string()),
            Err(_) => {
                problem(
                    "tls_origin_server_name",
                    format!("'{name}' is neither a DNS name nor an IP address"),
                );
                None
            }
        },
    };
    AppTls {
        mode,
        certificates,
        strict_sni: raw.tls_strict_sni.unwrap_or(false),
        min_version,
        origin_ca,
        origin_server_name,
    }
}

/// Relative paths in the TLS keys are relative to the config file's directory.
pub(crate) fn resolve_paths(app: &mut App, base: &Path) {
    let resolve = |path: &mut PathBuf| {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    };
    for files in &mut app.tls.certificates {
        resolve(&mut files.cert);
        resolve(&mut files.key);
    }
    if let Some(ca) = &mut app.tls.origin_ca {
        resolve(ca);
    }
}

/// Reads every certificate, key and CA bundle the TLS apps name, as `run` will:
/// one problem per file that cannot be read or parsed, and per key that does not
/// belong to its certificate.
pub(crate) fn check_files(apps: &[App], locations: &[String]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (app, location) in apps.iter().zip(locations) {
        if !app.tls.mode.terminates() {
            continue;
        }
        for (index, files) in app.tls.certificates.iter().enumerate() {
            if let Err(error) = crate::tls::certs::load_certificate(files) {
                let field = format!("tls_certificates[{index}].{}", error.file.as_str());
                problems.push(Problem::new(location, field, error.reason));
            }
        }
        if app.tls.mode == TlsMode::Strict {
            let ca = crate::tls::certs::load_roots(app.tls.origin_ca.as_deref());
            if let Err(reason) = ca {
                problems.push(Problem::new(location, "tls_origin_ca", reason));
            }
        }
    }
    problems
}
