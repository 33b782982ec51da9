//! Edge TLS termination for TCP apps (Spectrum's `flexible`, `full`, `strict`):
//! rustls with the `ring` provider, TLS 1.2 and 1.3 with rustls' default cipher
//! suites and key-exchange groups.
//!
//! * [`certs`]: PEM chains, keys and CA bundles; file stamps for the reload;
//! * [`handshake`]: the client leg (first bytes, ClientHello, SNI, finish) and the
//!   origin leg, with their failure reasons and status codes;
//! * [`verify`]: the origin certificate policy of `full` (not validated);
//! * [`pump`]: moving bytes both ways through rustls (no splice for TLS).
//!
//! One [`Terminator`] per TLS app holds its served certificates, replaced when the
//! files change (open connections keep what they started with), and its origin
//! client config. `docs/tcp.md` ("TLS") describes the design.

pub mod certs;
pub mod handshake;
pub mod pump;
pub mod verify;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use anyhow::{Context as _, anyhow};
use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};

use crate::config::{AppTls, TlsMode, TlsVersion};
use certs::FileStamp;

/// The crypto provider of every TLS connection: `ring`, its default suites.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The protocol versions allowed from `min` up.
fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        TlsVersion::Tls12 => &BOTH,
        TlsVersion::Tls13 => &TLS13_ONLY,
    }
}

/// Always serves one certificate: each certificate has its own `ServerConfig`,
/// chosen by SNI before the handshake goes on (see [`Terminator::choose`]).
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// One served certificate: its leaf (for SNI matching) and its server config.
struct Served {
    leaf: CertificateDer<'static>,
    config: Arc<ServerConfig>,
}

/// The certificates of an app as last read.
struct ServedSet {
    certificates: Vec<Served>,
    stamps: Vec<Option<FileStamp>>,
}

/// Why no certificate was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSniMatch;

/// One TLS app's termination state.
pub struct Terminator {
    settings: AppTls,
    served: RwLock<Arc<ServedSet>>,
    /// The stamps of the last attempt to read the files (a failed reload is not
    /// retried until the files change again).
    tried: Mutex<Vec<Option<FileStamp>>>,
    /// `full`/`strict`: how the agent talks TLS to the origin.
    origin: Option<Arc<ClientConfig>>,
}

impl Terminator {
    /// Reads the app's certificates (and for `strict` its CA bundle).
    pub fn new(app_id: &str, settings: &AppTls) -> anyhow::Result<Terminator> {
        if !settings.mode.terminates() {
            return Err(anyhow!("app {app_id}: tls is off"));
        }
        let served = Self::read(settings).with_context(|| format!("app {app_id}"))?;
        let origin = match settings.mode {
            TlsMode::Off | TlsMode::Flexible => None,
            TlsMode::Full => Some(client_config(
                settings.min_version,
                verify::NotValidated::config_part(),
            )?),
            TlsMode::Strict => {
                let roots = certs::load_roots(settings.origin_ca.as_deref())
                    .map_err(|reason| anyhow!("app {app_id}: tls_origin_ca: {reason}"))?;
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider(),
                )
                .build()
                .with_context(|| format!("app {app_id}: the origin certificate verifier"))?;
                Some(client_config(settings.min_version, verifier)?)
            }
        };
        Ok(Terminator {
            tried: Mutex::new(served.stamps.clone()),
            served: RwLock::new(Arc::new(served)),
            settings: settings.clone(),
            origin,
        })
    }

    fn read(settings: &AppTls) -> anyhow::Result<ServedSet> {
        // Stamps before contents: a file rewritten while it is read is read again
        // at the next check.
        let stamps = certs::stamps(&settings.certificates);
        let mut certificates = Vec::with_capacity(settings.certificates.len());
        for (index, files) in settings.certificates.iter().enumerate() {
            let key = certs::load_certificate(files).map_err(|e| {
                anyhow!(
                    "tls_certificates[{index}].{}: {}",
                    e.file.as_str(),
                    e.reason
                )
            })?;
            let leaf = key
                .cert
                .first()
                .cloned()
                .context("a certificate chain without certificates")?;
            let config = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(versions(settings.min_version))
                .context("the TLS protocol versions")?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(OneCertificate(key)));
            certificates.push(Served {
                leaf,
                config: Arc::new(config),
            });
        }
        Ok(ServedSet {
            certificates,
            stamps,
        })
    }

    pub fn settings(&self) -> &AppTls {
        &self.settings
    }

    /// The server config for a client that sent `sni`: the first certificate valid
    /// for the name (wildcards as in certificate validation), else the first one
    /// (the default) unless `tls_strict_sni`. No SNI: the default.
    pub fn choose(&self, sni: Option<&str>) -> Result<Arc<ServerConfig>, NoSniMatch> {
        let served = self
            .served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let default = served.certificates.first().ok_or(NoSniMatch)?;
        let Some(name) = sni.and_then(|s| ServerName::try_from(s).ok()) else {
            return if sni.is_some() && self.settings.strict_sni {
                Err(NoSniMatch)
            } else {
                Ok(default.config.clone())
            };
        };
        let matching = served.certificates.iter().find(|served| {
            webpki::EndEntityCert::try_from(&served.leaf)
                .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
        });
        match matching {
            Some(served) => Ok(served.config.clone()),
            None if self.settings.strict_sni => Err(NoSniMatch),
            None => Ok(default.config.clone()),
        }
    }

    /// Reads the certificates again when a file changed since the last attempt.
    /// `None`: nothing changed; `Some(Err)`: changed but unusable (the previous
    /// certificates stay in service).
    pub fn reload_if_changed(&self) -> Option<anyhow::Result<()>> {
        let now = certs::stamps(&self.settings.certificates);
        {
            let mut tried = self.tried.lock().unwrap_or_else(|e| e.into_inner());
            if *tried == now {
                return None;
            }
            *tried = now;
        }
        Some(Self::read(&self.settings).map(|served| {
            *self.served.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(served);
        }))
    }

    /// The origin leg's client config (`full`/`strict`), offering `alpn`.
    pub fn origin_config(&self, alpn: &[Vec<u8>]) -> Option<Arc<ClientConfig>> {
        let config = self.origin.as_ref()?;
        if alpn.is_empty() {
            return Some(config.clone());
        }
        let mut with_alpn = (**config).clone();
        with_alpn.alpn_protocols = alpn.to_vec();
        Some(Arc::new(with_alpn))
    }

    /// The name the origin leg sends (SNI) and, for `strict`, validates:
    /// `tls_origin_server_name`, else the client's SNI, else the origin's address.
    pub fn origin_server_name(
        &self,
        client_sni: Option<&str>,
        origin: IpAddr,
    ) -> ServerName<'static> {
        self.settings
            .origin_server_name
            .as_deref()
            .or(client_sni)
            .and_then(|name| ServerName::try_from(name.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(origin.into()))
    }
}

fn client_config(
    min: TlsVersion,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(min))
        .context("the TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
