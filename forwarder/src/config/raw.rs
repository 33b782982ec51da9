//! The config file as written: serde structs with `deny_unknown_fields`, every value
//! still a string, and the reader that splits a TOML document into them.
//!
//! The reader deserializes each table on its own (agent, firewall, every access rule,
//! every app), so that one bad table does not hide the problems of the others, and it
//! reports every unknown key, each with its line. Turning strings into the model and
//! checking the rules is `validate`'s job.

use std::ops::Range;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserializer, Serialize};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::Problem;
use super::model::{App, PortSpec};

#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<RawAgent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firewall: Option<RawFirewall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_rules: Vec<RawAccessRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<RawApp>,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_addresses: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_nat_ports: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_new_flows_per_source: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_splice: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_engine: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFirewall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_ips: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_direct: Option<Vec<RawOrigin>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_firewall: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_new_flows_per_second: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_fastpath: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_certificates: Option<Vec<RawCertificate>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_strict_sni: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tls_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_origin_ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_origin_server_name: Option<String>,
}

/// One `tls_certificates` entry: `{ cert = "...", key = "..." }`.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// One `origin_direct` entry: the URL alone, or a table with a weight.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum RawOrigin {
    Url(String),
    Weighted(RawWeightedOrigin),
}

impl RawOrigin {
    /// The URL text, whichever form.
    pub fn url(&self) -> Option<&str> {
        match self {
            RawOrigin::Url(url) => Some(url),
            RawOrigin::Weighted(w) => w.address.as_deref(),
        }
    }
}

impl From<String> for RawOrigin {
    fn from(url: String) -> Self {
        RawOrigin::Url(url)
    }
}

/// `{ address = "tcp://10.0.0.5:22", weight = 3 }`.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWeightedOrigin {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// `[apps.health_check]`.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_hex: Option<String>,
}

/// The sections of a document that could be read. A table that could not be read is
/// `None` (its problems are recorded); list positions are kept so indexes stay true.
#[derive(Debug, Default)]
pub(crate) struct RawSections {
    pub agent: Option<RawAgent>,
    pub firewall: Option<RawFirewall>,
    pub access_rules: Vec<Option<RawAccessRule>>,
    pub apps: Vec<Option<RawApp>>,
    /// For apps that could not be read: their id if it was readable, for the duplicate check.
    pub unread_app_ids: Vec<Option<String>>,
}

/// Where an app is, for messages: `app 'game' (apps[0])`, or `apps[0]` without an id.
pub(crate) fn app_location(id: Option<&str>, index: usize) -> String {
    match id {
        // Escaped: an id with a newline must not forge a line of the error report.
        Some(id) => format!("app '{}' (apps[{index}])", id.escape_debug()),
        None => format!("apps[{index}]"),
    }
}

/// Reads `text` into sections, recording every syntax error, unknown key and
/// wrongly typed value in `problems`.
pub(crate) fn read_document(text: &str, problems: &mut Vec<Problem>) -> RawSections {
    let mut sections = RawSections::default();
    let document = match DeTable::parse(text) {
        Ok(document) => document.into_inner(),
        Err(error) => {
            problems.push(Problem::new(
                "config",
                "",
                format!(
                    "TOML syntax error{}: {}",
                    at_line_column(text, error.span()),
                    one_line(error.message())
                ),
            ));
            return sections;
        }
    };
    // Sections in a fixed order (the parsed table is sorted by key), so problems are
    // listed agent first, apps last, whatever the order in the file.
    let mut entries: Vec<_> = document.into_iter().collect();
    let mut take = |name: &str| {
        let position = entries
            .iter()
            .position(|(key, _)| key.get_ref().as_ref() == name)?;
        Some(entries.remove(position).1)
    };
    let (agent, firewall) = (take("agent"), take("firewall"));
    let (access_rules, apps) = (take("access_rules"), take("apps"));
    for (key, _) in &entries {
        problems.push(unknown_key_problem::<RawConfig>(
            text,
            "config",
            key.get_ref(),
            key.span(),
        ));
    }
    match agent {
        Some(agent) => sections.agent = read_table(text, agent, "agent", problems),
        None => problems.push(Problem::new(
            "agent",
            "",
            "missing [agent] table (at least `interfaces` is required)",
        )),
    }
    if let Some(firewall) = firewall {
        sections.firewall = read_table(text, firewall, "firewall", problems);
    }
    for (index, rule) in access_rules
        .map(|rules| read_array_of_tables(text, rules, "access_rules", problems))
        .unwrap_or_default()
    {
        let location = format!("access_rules[{index}]");
        sections
            .access_rules
            .push(read_table(text, rule, &location, problems));
    }
    for (index, app) in apps
        .map(|apps| read_array_of_tables(text, apps, "apps", problems))
        .unwrap_or_default()
    {
        let id = app_id(&app);
        let location = app_location(id.as_deref(), index);
        let raw_app = read_table::<RawApp>(text, app, &location, problems);
        sections
            .unread_app_ids
            .push(if raw_app.is_none() { id } else { None });
        sections.apps.push(raw_app);
    }
    sections
}

/// The entries of an array of tables (`[[apps]]`), with their indexes; a problem for
/// anything else.
fn read_array_of_tables<'i>(
    text: &str,
    value: Spanned<DeValue<'i>>,
    name: &str,
    problems: &mut Vec<Problem>,
) -> Vec<(usize, Spanned<DeValue<'i>>)> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items.into_iter().enumerate().collect(),
        other => {
            problems.push(Problem::new(
                "config",
                name,
                format!(
                    "expected an array of tables ([[{name}]]), found {}{}",
                    other.type_str(),
                    at_line(text, Some(span))
                ),
            ));
            Vec::new()
        }
    }
}

/// Deserializes one table into `T`: unknown keys are reported (each with its line)
/// and left out, then a type error, if any, is reported against its key.
fn read_table<T: DeserializeOwned>(
    text: &str,
    value: Spanned<DeValue<'_>>,
    location: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let span = value.span();
    let table = match value.into_inner() {
        DeValue::Table(table) => table,
        other => {
            problems.push(Problem::new(
                location,
                "",
                format!(
                    "expected a table, found {}{}",
                    other.type_str(),
                    at_line(text, Some(span))
                ),
            ));
            return None;
        }
    };
    let known_keys = struct_fields::<T>();
    for (key, _) in table.iter() {
        if !known_keys.contains(&key.get_ref().as_ref()) {
            problems.push(unknown_key_problem::<T>(
                text,
                location,
                key.get_ref(),
                key.span(),
            ));
        }
    }
    // Leave unknown keys out, so the known ones can still be checked.
    let table: DeTable<'_> = table
        .into_iter()
        .filter(|(key, _)| known_keys.contains(&key.get_ref().as_ref()))
        .collect();
    // Key and value spans, to name the key a type error points into.
    let entry_spans: Vec<(String, Range<usize>, Range<usize>)> = table
        .iter()
        .map(|(key, value)| (key.get_ref().to_string(), key.span(), value.span()))
        .collect();
    match T::deserialize(ValueDeserializer::from(Spanned::new(
        span,
        DeValue::Table(table),
    ))) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            let error_span = error.span();
            let field = error_span
                .as_ref()
                .and_then(|error_span| {
                    entry_spans.iter().find(|(_, key_span, value_span)| {
                        contains(key_span, error_span.start)
                            || contains(value_span, error_span.start)
                    })
                })
                .map(|(key, _, _)| key.clone())
                .unwrap_or_default();
            problems.push(Problem::new(
                location,
                field,
                format!("{}{}", one_line(error.message()), at_line(text, error_span)),
            ));
            None
        }
    }
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// The app's id as validation will know it (explicit, or the default from `protocol`),
/// so the problems found while reading name the app the same way.
fn app_id(app: &Spanned<DeValue<'_>>) -> Option<String> {
    string_entry(app, "id").or_else(|| {
        let spec: PortSpec = string_entry(app, "protocol")?.parse().ok()?;
        Some(App::default_id(&spec))
    })
}

/// The value of `key` in `table` when it is a string.
fn string_entry(value: &Spanned<DeValue<'_>>, key: &str) -> Option<String> {
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    table
        .iter()
        .find(|(entry_key, _)| entry_key.get_ref().as_ref() == key)
        .and_then(|(_, value)| value.get_ref().as_str().map(str::to_string))
}

fn unknown_key_problem<T: DeserializeOwned>(
    text: &str,
    location: &str,
    key: &str,
    span: Range<usize>,
) -> Problem {
    Problem::new(
        location,
        key,
        format!(
            "unknown key{}; expected one of: {}",
            at_line(text, Some(span)),
            struct_fields::<T>().join(", ")
        ),
    )
}

/// ` (line N)` for a byte offset span into `text`, or nothing without a span.
fn at_line(text: &str, span: Option<Range<usize>>) -> String {
    match span {
        Some(span) => {
            let offset = span.start.min(text.len());
            let line = text.as_bytes()[..offset]
                .iter()
                .filter(|&&byte| byte == b'\n')
                .count()
                + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// ` (line N, column C)`, columns counted in characters from 1.
fn at_line_column(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let offset = (0..=span.start.min(text.len()))
        .rev()
        .find(|&offset| text.is_char_boundary(offset))
        .unwrap_or(0);
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    format!(" (line {line}, column {column})")
}

/// toml's messages may span lines; a problem is one line.
fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The field names of a `#[derive(Deserialize)]` struct, read from serde itself so the
/// unknown-key check can never disagree with the struct.
pub(crate) fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The capturing deserializer always fails; only the side effect matters.
    let _ = T::deserialize(FieldCapture {
        fields: &mut fields,
    });
    fields
}

struct FieldCapture<'a> {
    fields: &'a mut &'static [&'static str],
}

impl<'de> Deserializer<'de> for FieldCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.fields = fields;
        Err(de::Error::custom("field names captured"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs have field names"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_fields_come_from_serde() {
        assert_eq!(
            struct_fields::<RawConfig>(),
            ["agent", "firewall", "access_rules", "apps"]
        );
        assert_eq!(struct_fields::<RawFirewall>(), ["default"]);
        assert_eq!(struct_fields::<RawApp>().len(), 15);
    }

    #[test]
    fn at_line_counts_from_one() {
        let text = "a = 1\nb = 2\n";
        assert_eq!(at_line(text, Some(6..7)), " (line 2)");
        assert_eq!(at_line(text, Some(0..1)), " (line 1)");
        assert_eq!(at_line(text, None), "");
        assert_eq!(
            at_line_column("a = 1\nbé = [\n", Some(11..12)),
            " (line 2, column 5)"
        );
    }
}
