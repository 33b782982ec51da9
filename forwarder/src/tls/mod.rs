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
#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;
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
                OriginCheck::NotValidated,
            )?),
            TlsMode::Strict => {
                let roots = certs::load_roots(settings.origin_ca.as_deref())
                    .map_err(|reason| anyhow!("app {app_id}: tls_origin_ca: {reason}"))?;
                let verifier =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                        .build()
                        .with_context(|| {
                            format!("app {app_id}: the origin certificate verifier")
                        })?;
                Some(client_config(
                    settings.min_version,
                    OriginCheck::Validated(verifier),
                )?)
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

/// How the origin leg treats the origin's certificate.
enum OriginCheck {
    /// `full`: accepted as it is ([`verify::NotValidated`]).
    NotValidated,
    /// `strict`: validated against the CA store, for the origin's server name.
    Validated(Arc<rustls::client::WebPkiServerVerifier>),
}

fn client_config(min: TlsVersion, check: OriginCheck) -> anyhow::Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(min))
        .context("the TLS protocol versions")?;
    let config = match check {
        OriginCheck::NotValidated => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::NotValidated)),
        OriginCheck::Validated(verifier) => builder.with_webpki_verifier(verifier),
    }
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::test_pki::TestPki;
    use super::*;
    use crate::config::CertificateFiles;

    fn settings(certificates: Vec<CertificateFiles>, strict_sni: bool) -> AppTls {
        AppTls {
            mode: TlsMode::Flexible,
            certificates,
            strict_sni,
            ..AppTls::default()
        }
    }

    #[test]
    fn sni_chooses_the_certificate_whose_names_match_else_the_default() {
        let pki = TestPki::new("sni");
        let ca = pki.ca("ca");
        let a = pki.leaf("a", &["a.example"], Some(&ca));
        let b = pki.leaf("b", &["*.b.example", "b.example"], Some(&ca));
        let t = Terminator::new("t", &settings(vec![a.clone(), b.clone()], false)).unwrap();
        let chosen = |sni| t.choose(sni).unwrap();
        assert!(
            Arc::ptr_eq(&chosen(Some("a.example")), &chosen(None)),
            "a is the default"
        );
        let b_config = chosen(Some("www.b.example"));
        assert!(!Arc::ptr_eq(&b_config, &chosen(Some("a.example"))));
        assert!(Arc::ptr_eq(&b_config, &chosen(Some("b.example"))));
        assert!(
            Arc::ptr_eq(&chosen(Some("other.example")), &chosen(None)),
            "an unknown name gets the default"
        );
        let strict = Terminator::new("t", &settings(vec![a, b], true)).unwrap();
        assert_eq!(strict.choose(Some("other.example")).err(), Some(NoSniMatch));
        assert!(strict.choose(Some("a.example")).is_ok());
        assert!(
            strict.choose(None).is_ok(),
            "no SNI: the default, even strict"
        );
    }

    #[test]
    fn changed_files_are_read_again_and_bad_ones_keep_the_old() {
        let pki = TestPki::new("reload");
        let first = pki.leaf("one", &["one.example"], None);
        let files = CertificateFiles {
            cert: pki.dir().join("served.pem"),
            key: pki.dir().join("served.key"),
        };
        std::fs::copy(&first.cert, &files.cert).unwrap();
        std::fs::copy(&first.key, &files.key).unwrap();
        let t = Terminator::new("t", &settings(vec![files.clone()], true)).unwrap();
        assert!(t.reload_if_changed().is_none(), "nothing changed");
        assert!(t.choose(Some("one.example")).is_ok());
        // A new certificate under the same paths (renamed into place, as tools do).
        let second = pki.leaf("two", &["two.example"], None);
        std::fs::copy(&second.key, pki.dir().join("tmp.key")).unwrap();
        std::fs::rename(pki.dir().join("tmp.key"), &files.key).unwrap();
        // Key replaced, certificate not yet: unusable, the old stays.
        assert!(matches!(t.reload_if_changed(), Some(Err(_))));
        assert!(t.choose(Some("one.example")).is_ok());
        std::fs::copy(&second.cert, pki.dir().join("tmp.pem")).unwrap();
        std::fs::rename(pki.dir().join("tmp.pem"), &files.cert).unwrap();
        assert!(matches!(t.reload_if_changed(), Some(Ok(()))));
        assert!(t.choose(Some("two.example")).is_ok());
        assert_eq!(t.choose(Some("one.example")).err(), Some(NoSniMatch));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let pki = TestPki::new("mismatch");
        let a = pki.leaf("a", &["a.example"], None);
        let b = pki.leaf("b", &["b.example"], None);
        let crossed = CertificateFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err = certs::load_certificate(&crossed).unwrap_err();
        assert_eq!(err.file, certs::WhichFile::Key);
        assert!(
            err.reason.contains("is not the key of the certificate"),
            "{}",
            err.reason
        );
        let swapped = CertificateFiles {
            cert: a.key.clone(),
            key: a.cert.clone(),
        };
        assert_eq!(
            certs::load_certificate(&swapped).unwrap_err().file,
            certs::WhichFile::Cert
        );
        assert!(certs::load_certificate(&a).is_ok());
        assert!(certs::load_roots(Some(&pki.dir().join("missing.pem"))).is_err());
        assert!(
            certs::load_roots(Some(&a.key)).is_err(),
            "a key is no CA bundle"
        );
    }

    #[test]
    fn the_origin_name_is_the_setting_else_the_sni_else_the_address() {
        let pki = TestPki::new("names");
        let a = pki.leaf("a", &["a.example"], None);
        let mut s = settings(vec![a], false);
        s.mode = TlsMode::Full;
        let t = Terminator::new("t", &s).unwrap();
        let ip: IpAddr = "10.0.2.2".parse().unwrap();
        assert_eq!(
            t.origin_server_name(Some("c.example"), ip),
            ServerName::try_from("c.example").unwrap()
        );
        assert_eq!(
            t.origin_server_name(None, ip),
            ServerName::IpAddress(ip.into())
        );
        s.origin_server_name = Some("origin.internal".into());
        let t = Terminator::new("t", &s).unwrap();
        assert_eq!(
            t.origin_server_name(Some("c.example"), ip),
            ServerName::try_from("origin.internal").unwrap()
        );
        assert!(t.origin_config(&[b"h2".to_vec()]).is_some());
    }
}
