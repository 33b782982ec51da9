//! `forwarder import-spectrum FILE`: Cloudflare Spectrum API JSON → `[[apps]]` TOML.
//!
//! Accepts the API envelope (`{"result": [...], "success": true, ...}`, as returned by
//! `GET /zones/:zone/spectrum/apps`; `result` may also be one app object), a bare list
//! of app objects, or one bare app object. Fields map one to one where the meaning is
//! the same; every other field is reported as ignored — never silently dropped.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Map, Value};

use crate::config::{self, Config, Problem, RawApp, RawOrigin, app_location};

/// The result of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// `[[apps]]` tables, ready to append to a config with an `[agent]` table.
    pub toml: String,
    /// Paths of fields that have no meaning here, e.g. `apps[0].dns`, `apps[1].edge_ips.type`.
    pub ignored: Vec<String>,
    /// Apps left out of `toml` because they cannot work here, with the reason
    /// (an app with only `origin_dns`, for example).
    pub skipped: Vec<String>,
    /// What `check-config` would say about the imported apps (e.g. a UDP app mixing
    /// IPv4 and IPv6); empty when they are valid.
    pub problems: Vec<Problem>,
    /// What the operator must fill in before the apps can run here (Cloudflare's
    /// static edge addresses, replaced by `EDGE_PLACEHOLDER`).
    pub fill_in: Vec<String>,
}

/// Written where an app had Cloudflare's static edge addresses: they are not this
/// host's, and a config with them would be refused by `run`. Not an address, so
/// `check-config` refuses it until the operator puts this host's edge address in.
pub const EDGE_PLACEHOLDER: &str = "EDGE-ADDRESS-OF-THIS-HOST";

/// Where an imported TLS app's certificate and key are expected: Spectrum served
/// the zone's edge certificate, which cannot be exported, so the operator puts
/// the app's own PEM files here (`<dir>/<app id>.pem`, `.key`).
pub const TLS_CERTIFICATE_DIR: &str = "/etc/forwarder/tls";

/// Whether `field` with `value` changes nothing here, so that saying it is ignored
/// would only be noise: TLS off (pass-through, as here), Argo off, direct traffic,
/// API timestamps, connectivity to every family.
fn changes_nothing(field: &str, value: &Value) -> bool {
    match field {
        "tls" => value.is_null() || value == "off",
        "argo_smart_routing" => value.is_null() || value == &Value::Bool(false),
        "traffic_type" => value.is_null() || value == "direct",
        "created_on" | "modified_on" => true,
        "connectivity" => value.is_null() || value == "all",
        // With origin_direct, the ports are in the origin URLs.
        "origin_port" => true,
        _ => false,
    }
}

/// Why a Spectrum field is ignored, by its name (the last part of its path).
pub fn why_ignored(field: &str) -> &'static str {
    match field {
        "dns" => {
            "the DNS record lives at Cloudflare; point your own DNS name at the edge addresses"
        }
        "argo_smart_routing" => "Argo Smart Routing is a Cloudflare network feature",
        "traffic_type" => "only direct L4 proxying exists here",
        "type" => "edge addresses come from the local interfaces and agent.edge_addresses",
        "connectivity" => "edge addresses come from the local interfaces and agent.edge_addresses",
        "ips" => "only used when edge_ips.type is \"static\"",
        "origin_dns" => "DNS origins are not supported; use origin_direct",
        "origin_port" => "only used with origin_dns, which is not supported",
        "created_on" | "modified_on" => "Cloudflare API metadata",
        "errors" | "messages" | "result_info" | "success" => "API envelope",
        _ => "unknown Spectrum field",
    }
}

/// Walks any JSON document and fails on an object with the same key twice, which a
/// JSON value would keep silently (the last one wins).
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<NoDuplicateKeys, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<NoDuplicateKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the key {key:?} appears twice in one object"
                )));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }
}

/// Converts Spectrum JSON into `[[apps]]` TOML.
pub fn import(json: &str) -> anyhow::Result<Import> {
    serde_json::from_str::<NoDuplicateKeys>(json).context("not valid JSON")?;
    let document: Value = serde_json::from_str(json).context("not valid JSON")?;
    let mut ignored = Vec::new();
    let apps: Vec<Value> = match document {
        Value::Array(apps) => apps,
        Value::Object(mut envelope) => match envelope.remove("result") {
            Some(result) => {
                if envelope.get("success") == Some(&Value::Bool(false)) {
                    let errors = envelope
                        .get("errors")
                        .map(Value::to_string)
                        .unwrap_or_default();
                    bail!("the API response reports failure (\"success\": false): {errors}");
                }
                // The rest of the envelope is not app data; only unexpected keys are worth a word.
                for key in envelope.keys() {
                    if !matches!(
                        key.as_str(),
                        "success" | "errors" | "messages" | "result_info"
                    ) {
                        ignored.push(key.clone());
                    }
                }
                match result {
                    Value::Array(apps) => apps,
                    app @ Value::Object(_) => vec![app],
                    other => bail!(
                        "\"result\" is {}, expected a list of apps",
                        json_type(&other)
                    ),
                }
            }
            None if envelope.contains_key("protocol") => vec![Value::Object(envelope)],
            None => bail!("expected {{\"result\": [...]}}, a list of apps or one app object"),
        },
        other => bail!(
            "the document is {}, expected {{\"result\": [...]}} or a list of apps",
            json_type(&other)
        ),
    };

    let mut raw_apps = Vec::with_capacity(apps.len());
    let mut skipped = Vec::new();
    let mut fill_in = Vec::new();
    for (index, app) in apps.into_iter().enumerate() {
        let path = format!("apps[{index}]");
        let Value::Object(fields) = app else {
            bail!("{path} is {}, expected an app object", json_type(&app));
        };
        // What to fill in only counts for an app that is kept.
        let mut app_fill_in = Vec::new();
        let raw = convert_app(&path, fields, &mut ignored, &mut app_fill_in)?;
        if raw.origin_direct.as_ref().is_none_or(Vec::is_empty) {
            skipped.push(format!(
                "{}: no origin_direct (origin_dns is not supported), so the app is left out",
                app_location(raw.id.as_deref(), index)
            ));
            continue;
        }
        fill_in.extend(app_fill_in);
        raw_apps.push(raw);
    }

    let body = config::apps_to_toml(&raw_apps).context("writing the apps as TOML")?;
    let mut notes = String::new();
    for line in &fill_in {
        notes.push_str(&format!("# FILL IN: {line}\n"));
    }
    let toml = format!(
        "# Imported from Spectrum API JSON by `forwarder import-spectrum`.\n\
         # Add an [agent] table (see docs/config.md) before using this as a config.\n\
         {notes}\n{body}"
    );
    // The apps' own problems; a placeholder is the operator's to fill in, not one.
    let checked = body.replace(EDGE_PLACEHOLDER, "192.0.2.1");
    let problems = match Config::parse(&format!("[agent]\ninterfaces = [\"eth0\"]\n\n{checked}")) {
        Ok(_) => Vec::new(),
        Err(error) => error.problems,
    };
    Ok(Import {
        toml,
        ignored,
        skipped,
        problems,
        fill_in,
    })
}

/// One Spectrum app object → the same app in config terms.
fn convert_app(
    path: &str,
    fields: Map<String, Value>,
    ignored: &mut Vec<String>,
    fill_in: &mut Vec<String>,
) -> anyhow::Result<RawApp> {
    let mut raw = RawApp::default();
    let mut tls = None;
    for (key, value) in fields {
        if changes_nothing(&key, &value) {
            continue;
        }
        let field_path = format!("{path}.{key}");
        // null is how the API writes "not set"; it means the same as absent.
        if value.is_null() && is_mapped_field(&key) {
            continue;
        }
        match key.as_str() {
            "id" => raw.id = Some(string(&field_path, value)?),
            "protocol" => raw.protocol = Some(string(&field_path, value)?),
            "origin_direct" => {
                raw.origin_direct = Some(
                    string_list(&field_path, value)?
                        .into_iter()
                        .map(RawOrigin::from)
                        .collect(),
                )
            }
            "proxy_protocol" => {
                raw.proxy_protocol = Some(match value {
                    Value::String(mode) => mode,
                    // Older API versions had a boolean that meant PROXY v1.
                    Value::Bool(true) => "v1".to_string(),
                    Value::Bool(false) => "off".to_string(),
                    other => bail!("{field_path} is {}, expected a string", json_type(&other)),
                })
            }
            "ip_firewall" => match value {
                Value::Bool(enabled) => raw.ip_firewall = Some(enabled),
                other => bail!(
                    "{field_path} is {}, expected true or false",
                    json_type(&other)
                ),
            },
            "edge_ips" => raw.edge_ips = edge_ips(&field_path, value, ignored, fill_in)?,
            "tls" => tls = Some(string(&field_path, value)?),
            _ => ignored.push(field_path),
        }
    }
    // After the loop: the certificate's file names come from the app's id.
    if let Some(mode) = tls {
        edge_tls(path, &mode, &mut raw, fill_in);
        raw.tls = Some(mode);
    }
    Ok(raw)
}

/// `tls` (flexible, full, strict): the same mode here, with certificate files the
/// operator must supply (named after the app) — check-config reads them.
fn edge_tls(path: &str, mode: &str, raw: &mut RawApp, fill_in: &mut Vec<String>) {
    let name: String = raw
        .id
        .as_deref()
        .unwrap_or(path)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cert = format!("{TLS_CERTIFICATE_DIR}/{name}.pem");
    let key = format!("{TLS_CERTIFICATE_DIR}/{name}.key");
    let origin = match mode {
        "strict" => {
            "; the origin's certificate is validated against the system CA store \
             (tls_origin_ca names another bundle)"
        }
        _ => "",
    };
    fill_in.push(format!(
        "{path}: tls = \"{mode}\": put this app's certificate chain (PEM, leaf first) in \
         {cert} and its private key in {key} (Spectrum served Cloudflare's edge \
         certificate, which cannot be exported){origin}"
    ));
    raw.tls_certificates = Some(vec![config::RawCertificate {
        cert: Some(cert),
        key: Some(key),
    }]);
}

fn is_mapped_field(key: &str) -> bool {
    matches!(
        key,
        "id" | "protocol" | "origin_direct" | "proxy_protocol" | "ip_firewall" | "edge_ips" | "tls"
    )
}

/// `edge_ips: {type, connectivity, ips}`: static `ips` become the app's `edge_ips`;
/// dynamic ones (Cloudflare-assigned) mean every local edge address.
fn edge_ips(
    path: &str,
    value: Value,
    ignored: &mut Vec<String>,
    fill_in: &mut Vec<String>,
) -> anyhow::Result<Option<Vec<String>>> {
    let Value::Object(fields) = value else {
        bail!("{path} is {}, expected an object", json_type(&value));
    };
    let is_static = match fields.get("type") {
        Some(Value::String(kind)) if kind == "static" => true,
        Some(Value::String(kind)) if kind == "dynamic" => false,
        Some(other) => bail!("{path}.type is {other}, expected \"static\" or \"dynamic\""),
        None => fields.contains_key("ips"),
    };
    let mut ips = None;
    for (key, value) in fields {
        match key.as_str() {
            "ips" if is_static => ips = Some(string_list(&format!("{path}.ips"), value)?),
            // Consumed above.
            "type" => {}
            _ if changes_nothing(&key, &value) => {}
            _ => ignored.push(format!("{path}.{key}")),
        }
    }
    // An empty list would mean "every edge address": far wider than what static meant.
    if is_static && ips.as_ref().is_none_or(Vec::is_empty) {
        bail!("{path}.type is \"static\" but {path}.ips lists no address");
    }
    // Static addresses are Cloudflare's (or a BYOIP prefix announced by Cloudflare):
    // not this host's.
    Ok(ips.map(|cloudflare| {
        fill_in.push(format!(
            "{path}: Cloudflare's static edge addresses ({}) are not this host's; \
             replace {EDGE_PLACEHOLDER} with this host's edge address(es), or remove \
             edge_ips to serve the app on every edge address",
            cloudflare.join(", ")
        ));
        vec![EDGE_PLACEHOLDER.to_string()]
    }))
}

fn string(path: &str, value: Value) -> anyhow::Result<String> {
    match value {
        Value::String(text) => Ok(text),
        other => bail!("{path} is {}, expected a string", json_type(&other)),
    }
}

fn string_list(path: &str, value: Value) -> anyhow::Result<Vec<String>> {
    let Value::Array(items) = value else {
        bail!(
            "{path} is {}, expected a list of strings",
            json_type(&value)
        );
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| string(&format!("{path}[{index}]"), item))
        .collect()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Cloudflare IP Access rules (`GET /zones/:zone/firewall/access_rules/rules`, the
/// envelope or a bare list) → `[[access_rules]]` TOML. `block` and `whitelist` map
/// to block and allow; targets `ip`, `ip6` and `ip_range` map as they are. Challenges
/// (`challenge`, `js_challenge`, `managed_challenge`) and `asn` / `country` targets
/// have no meaning at L4 here: each is reported, none silently dropped.
pub fn import_access_rules(json: &str) -> anyhow::Result<(String, Vec<String>)> {
    serde_json::from_str::<NoDuplicateKeys>(json).context("not valid JSON")?;
    let document: Value = serde_json::from_str(json).context("not valid JSON")?;
    let rules = match document {
        Value::Array(rules) => rules,
        Value::Object(mut envelope) => match envelope.remove("result") {
            Some(Value::Array(rules)) => rules,
            _ => bail!("expected {{\"result\": [...]}} or a list of access rules"),
        },
        other => bail!(
            "the document is {}, expected {{\"result\": [...]}} or a list of access rules",
            json_type(&other)
        ),
    };
    let mut raw = Vec::new();
    let mut notes = Vec::new();
    for (index, rule) in rules.into_iter().enumerate() {
        let path = format!("access_rules[{index}]");
        let Value::Object(fields) = rule else {
            bail!("{path} is {}, expected a rule object", json_type(&rule));
        };
        let mode = match fields.get("mode") {
            Some(Value::String(mode)) => mode.as_str(),
            _ => bail!("{path}.mode is missing or not a string"),
        };
        let Some(Value::Object(configuration)) = fields.get("configuration") else {
            bail!("{path}.configuration is missing or not an object");
        };
        let (Some(Value::String(target)), Some(Value::String(value))) =
            (configuration.get("target"), configuration.get("value"))
        else {
            bail!("{path}.configuration needs a string target and value");
        };
        let mode = match mode {
            "block" => "block",
            "whitelist" => "allow",
            other => {
                notes.push(format!(
                    "skipped {path} ({target} {value}): mode {other:?} is a challenge, which \
                     needs HTTP; only block and whitelist exist at L4"
                ));
                continue;
            }
        };
        let target = match target.as_str() {
            "ip" | "ip6" => "ip",
            "ip_range" => "ip_range",
            other => {
                notes.push(format!(
                    "skipped {path} ({other} {value}): only ip, ip6 and ip_range targets exist \
                     here"
                ));
                continue;
            }
        };
        raw.push(config::RawAccessRule {
            mode: Some(mode.to_string()),
            target: Some(target.to_string()),
            value: Some(value.clone()),
        });
    }
    let toml = config::access_rules_to_toml(&raw).context("writing the rules as TOML")?;
    Ok((toml, notes))
}

/// Reads `input` (`-` for stdin).
fn read_input(input: &Path) -> anyhow::Result<String> {
    if input.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(input).with_context(|| format!("cannot read {}", input.display()))
    }
}

/// What `import-spectrum` is given besides the apps.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// A file with an `[agent]` table (and anything else but apps): printed first,
    /// so that the output is a whole config.
    pub agent: Option<std::path::PathBuf>,
    /// Cloudflare IP Access rules JSON, converted to `[[access_rules]]`.
    pub access_rules: Option<std::path::PathBuf>,
}

/// Prints the TOML on stdout and every ignored field, skipped app or rule,
/// placeholder and problem on stderr. Exit 1 when an app was skipped or the result
/// does not pass `check-config` (the TOML is printed anyway), 0 otherwise.
pub fn import_cli(input: &Path, options: &ImportOptions) -> anyhow::Result<ExitCode> {
    let json = read_input(input)?;
    let name = if input.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        input.display().to_string()
    };
    let imported = import(&json).with_context(|| format!("cannot import {name}"))?;
    let mut out = String::new();
    let mut whole = None;
    if let Some(agent) = &options.agent {
        let text = std::fs::read_to_string(agent)
            .with_context(|| format!("cannot read {}", agent.display()))?;
        out.push_str(text.trim_end());
        out.push_str("\n\n");
        whole = Some(());
    }
    let mut rule_notes = Vec::new();
    if let Some(rules) = &options.access_rules {
        let text = read_input(rules)?;
        let (toml, notes) = import_access_rules(&text)
            .with_context(|| format!("cannot import the access rules of {}", rules.display()))?;
        out.push_str(&toml);
        out.push('\n');
        rule_notes = notes;
    }
    out.push_str(&imported.toml);
    print!("{out}");
    for path in &imported.ignored {
        let field = path.rsplit('.').next().unwrap_or(path);
        eprintln!("ignored {path}: {}", why_ignored(field));
    }
    for note in &rule_notes {
        eprintln!("{note}");
    }
    for line in &imported.fill_in {
        eprintln!("fill in {line}");
    }
    for skipped in &imported.skipped {
        eprintln!("skipped {skipped}");
    }
    let mut problems: Vec<String> = imported.problems.iter().map(ToString::to_string).collect();
    // A whole config (agent given): judged as `check-config` would, placeholders
    // aside.
    if whole.is_some() {
        let checked = out.replace(EDGE_PLACEHOLDER, "192.0.2.1");
        problems = match Config::parse(&checked) {
            Ok(_) => Vec::new(),
            Err(error) => error.problems.iter().map(ToString::to_string).collect(),
        };
    }
    for problem in &problems {
        eprintln!("problem {problem}");
    }
    if imported.skipped.is_empty() && problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVELOPE: &str = include_str!("../tests/configs/spectrum.json");

    fn wrap(toml: &str) -> String {
        format!("[agent]\ninterfaces = [\"eth0\"]\n\n{toml}")
    }

    #[test]
    fn a_duplicate_key_is_an_error_naming_it() {
        let json = r#"[{"protocol": "tcp/22", "protocol": "tcp/23", "origin_direct": ["tcp://192.0.2.1:22"]}]"#;
        let err = format!("{:#}", import(json).expect_err("a duplicate key"));
        assert!(
            err.contains("the key \"protocol\" appears twice in one object")
                && err.contains("line 1"),
            "{err}"
        );
        // The same key in two objects is fine.
        let json = r#"[{"protocol": "tcp/22", "origin_direct": ["tcp://192.0.2.1:22"]}, {"protocol": "tcp/23", "origin_direct": ["tcp://192.0.2.1:23"]}]"#;
        import(json).expect("two apps");
    }

    #[test]
    fn envelope_converts_to_apps_that_parse() {
        let imported = import(ENVELOPE).expect("import");
        let filled = imported.toml.replace(EDGE_PLACEHOLDER, "192.0.2.10");
        let config = Config::parse(&wrap(&filled)).unwrap_or_else(|error| {
            panic!("imported TOML does not parse:\n{error}\n{}", imported.toml)
        });
        assert_eq!(config.apps.len(), 3);
        let ssh = &config.apps[0];
        assert_eq!(ssh.id, "4590376cf2994d72cee36828ec4eff19");
        assert_eq!(ssh.port_spec().to_string(), "tcp/22");
        assert_eq!(ssh.origins[0].to_url(ssh.protocol), "tcp://192.0.2.1:22");
        assert_eq!(ssh.proxy_protocol, config::ProxyProtocol::Off);
        assert!(ssh.ip_firewall);
        assert!(
            ssh.edge_ips.is_empty(),
            "dynamic edge IPs mean every edge address"
        );
        let game = &config.apps[1];
        assert_eq!(game.port_spec().to_string(), "udp/27015");
        assert_eq!(game.proxy_protocol, config::ProxyProtocol::Simple);
        assert_eq!(
            game.edge_ips,
            ["192.0.2.10".parse::<std::net::IpAddr>().expect("ip")],
            "the placeholder, filled in"
        );
        assert!(!game.ip_firewall);
        let range = &config.apps[2];
        assert_eq!(range.port_spec().to_string(), "tcp/1000-2000");
        assert_eq!(
            range.origins[0].to_url(range.protocol),
            "tcp://[2001:db8::7]:1000-2000"
        );
        assert_eq!(range.proxy_protocol, config::ProxyProtocol::V2);
        assert!(
            imported.skipped.is_empty() && imported.problems.is_empty(),
            "{imported:?}"
        );
    }

    #[test]
    fn only_fields_that_change_something_are_reported() {
        // tls off, Argo off, direct traffic, timestamps, connectivity "all": as here.
        let imported = import(ENVELOPE).expect("import");
        assert_eq!(
            imported.ignored,
            [
                "apps[0].dns",
                "apps[1].dns",
                "apps[2].dns",
                "apps[2].surprise",
            ]
        );
        // The same fields with values that mean something else are reported.
        let json = r#"[{"protocol":"tcp/22","origin_direct":["tcp://192.0.2.1:22"],
            "tls":"flexible","argo_smart_routing":true,"traffic_type":"http",
            "edge_ips":{"type":"dynamic","connectivity":"ipv4"}}]"#;
        assert_eq!(
            import(json).expect("import").ignored,
            [
                "apps[0].argo_smart_routing",
                "apps[0].edge_ips.connectivity",
                "apps[0].traffic_type",
            ]
        );
    }

    #[test]
    fn tls_is_mapped_with_the_certificate_files_to_supply() {
        let json = r#"[{"id":"web","protocol":"tcp/443","origin_direct":["tcp://192.0.2.1:443"],"tls":"strict"},
            {"id":"mail","protocol":"tcp/993","origin_direct":["tcp://192.0.2.2:993"],"tls":"flexible"},
            {"id":"ssh","protocol":"tcp/22","origin_direct":["tcp://192.0.2.3:22"],"tls":"off"}]"#;
        let imported = import(json).expect("import");
        assert!(imported.ignored.is_empty(), "{:?}", imported.ignored);
        assert!(imported.problems.is_empty(), "{:?}", imported.problems);
        let config = Config::parse(&wrap(&imported.toml)).expect("parses");
        let web = &config.apps[0].tls;
        assert_eq!(web.mode, config::TlsMode::Strict);
        assert_eq!(
            web.certificates[0].cert,
            std::path::Path::new("/etc/forwarder/tls/web.pem")
        );
        assert_eq!(
            web.certificates[0].key,
            std::path::Path::new("/etc/forwarder/tls/web.key")
        );
        assert_eq!(config.apps[1].tls.mode, config::TlsMode::Flexible);
        assert_eq!(config.apps[2].tls, config::AppTls::default());
        assert_eq!(imported.fill_in.len(), 2, "{:?}", imported.fill_in);
        assert!(imported.fill_in[0].contains("/etc/forwarder/tls/web.pem"));
        assert!(imported.fill_in[0].contains("system CA store"));
        assert!(imported.fill_in[1].contains("/etc/forwarder/tls/mail.key"));
        // tls on a UDP app is a problem, as check-config would say.
        let udp = r#"[{"id":"dns","protocol":"udp/53","origin_direct":["udp://192.0.2.1:53"],"tls":"full"}]"#;
        let problems = import(udp).expect("import").problems;
        assert!(
            problems
                .iter()
                .any(|p| p.field == "tls" && p.reason.contains("TCP apps only")),
            "{problems:?}"
        );
    }

    #[test]
    fn cloudflare_static_edge_addresses_become_a_placeholder_to_fill_in() {
        let imported = import(ENVELOPE).expect("import");
        assert!(
            imported
                .toml
                .contains(&format!("edge_ips = [\"{EDGE_PLACEHOLDER}\"]"))
        );
        assert!(!imported.toml.contains("edge_ips = [\"198.51.100.5\"]"));
        assert_eq!(imported.fill_in.len(), 1);
        assert!(
            imported.fill_in[0]
                .starts_with("apps[1].edge_ips: Cloudflare's static edge addresses (198.51.100.5)"),
            "{:?}",
            imported.fill_in
        );
        assert!(
            imported.toml.contains("# FILL IN: apps[1].edge_ips"),
            "{}",
            imported.toml
        );
        // Until filled in, the config is refused, naming the field.
        let error = Config::parse(&wrap(&imported.toml)).expect_err("placeholder refused");
        assert!(
            error.problems.iter().any(|p| p.field == "edge_ips"),
            "{error}"
        );
        // Not a problem of the apps themselves.
        assert!(imported.problems.is_empty(), "{:?}", imported.problems);
    }

    #[test]
    fn access_rules_map_block_and_whitelist_and_report_the_rest() {
        let json = r#"{"success":true,"result":[
            {"mode":"block","configuration":{"target":"ip","value":"198.51.100.4"},"notes":"x"},
            {"mode":"whitelist","configuration":{"target":"ip_range","value":"10.0.0.0/8"}},
            {"mode":"block","configuration":{"target":"ip6","value":"2001:db8::1"}},
            {"mode":"challenge","configuration":{"target":"ip","value":"192.0.2.9"}},
            {"mode":"block","configuration":{"target":"country","value":"XX"}}]}"#;
        let (toml, notes) = import_access_rules(json).expect("import");
        let config = Config::parse(&format!("[agent]\ninterfaces = [\"eth0\"]\n\n{toml}"))
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let rules: Vec<(String, String, String)> = config
            .access_rules
            .iter()
            .map(|r| (r.mode.to_string(), r.target.to_string(), r.value.clone()))
            .collect();
        assert_eq!(
            rules,
            [
                ("block".into(), "ip".into(), "198.51.100.4".into()),
                ("allow".into(), "ip_range".into(), "10.0.0.0/8".into()),
                ("block".into(), "ip".into(), "2001:db8::1".into()),
            ]
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].contains("challenge") && notes[1].contains("country"),
            "{notes:?}"
        );
    }

    #[test]
    fn bare_list_and_single_objects_are_accepted() {
        let app = r#"{"id":"a","protocol":"tcp/22","origin_direct":["tcp://192.0.2.1:22"]}"#;
        for json in [
            format!("[{app}]"),
            app.to_string(),
            format!(r#"{{"result":{app},"success":true}}"#),
        ] {
            let imported = import(&json).expect("import");
            let config = Config::parse(&wrap(&imported.toml)).expect("parses");
            assert_eq!(config.apps[0].id, "a", "{json}");
            assert!(
                imported.ignored.is_empty(),
                "{json}: {:?}",
                imported.ignored
            );
        }
    }

    #[test]
    fn an_app_without_origin_direct_is_skipped_and_said_so() {
        let json = r#"[{"id":"dns-only","protocol":"tcp/22","origin_dns":{"name":"origin.example.com"},"origin_port":22},
                       {"id":"ok","protocol":"tcp/23","origin_direct":["tcp://192.0.2.1:23"]}]"#;
        let imported = import(json).expect("import");
        assert_eq!(
            imported.skipped,
            [
                "app 'dns-only' (apps[0]): no origin_direct (origin_dns is not supported), so the app is left out"
            ]
        );
        assert_eq!(imported.ignored, ["apps[0].origin_dns"]);
        let config = Config::parse(&wrap(&imported.toml)).expect("parses");
        assert_eq!(config.apps.len(), 1);
    }

    #[test]
    fn apps_this_forwarder_cannot_run_are_flagged() {
        let json = r#"[{"id":"mixed","protocol":"udp/53","origin_direct":["udp://192.0.2.1:53","udp://[2001:db8::1]:53"]}]"#;
        let imported = import(json).expect("import");
        assert_eq!(imported.problems.len(), 1);
        assert!(imported.problems[0].to_string().starts_with(
            "app 'mixed' (apps[0]): origin_direct: a UDP app's origins must share one IP family"
        ));
    }

    #[test]
    fn bad_json_is_an_error_naming_the_path() {
        let error = |json: &str| format!("{:#}", import(json).expect_err(json));
        assert!(error("{").contains("not valid JSON"));
        assert_eq!(
            error("42"),
            "the document is a number, expected {\"result\": [...]} or a list of apps"
        );
        assert_eq!(
            error(r#"[{"protocol": 22}]"#),
            "apps[0].protocol is a number, expected a string"
        );
        assert_eq!(
            error(r#"[{"protocol":"tcp/1","edge_ips":{"type":"static"}}]"#),
            "apps[0].edge_ips.type is \"static\" but apps[0].edge_ips.ips lists no address"
        );
        assert!(
            error(r#"{"result":[],"success":false,"errors":[{"code":10000}]}"#)
                .contains("\"success\": false")
        );
    }

    #[test]
    fn proxy_protocol_boolean_of_the_old_api_is_understood() {
        let json = r#"[{"protocol":"tcp/22","origin_direct":["tcp://192.0.2.1:22"],"proxy_protocol":true}]"#;
        let imported = import(json).expect("import");
        let config = Config::parse(&wrap(&imported.toml)).expect("parses");
        assert_eq!(config.apps[0].proxy_protocol, config::ProxyProtocol::V1);
    }
}
