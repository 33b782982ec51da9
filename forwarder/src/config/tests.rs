//! One bad config per rule (each asserting location, field and reason), defaults,
//! the full round trip and the host-side checks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::*;

const GOOD: &str = include_str!("../../tests/configs/good.toml");
const AGENT: &str = "[agent]\ninterfaces = [\"eth0\"]\n";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// `n` distinct `[[access_rules]]` blocking one IPv4 address each.
pub(super) fn block_rules(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"10.{}.{}.{}\"\n",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            )
        })
        .collect()
}

/// A minimal agent plus the given extra TOML (apps, rules, ...).
fn with_agent(rest: &str) -> String {
    format!("{AGENT}\n{rest}")
}

fn problems_of(text: &str) -> Vec<Problem> {
    match Config::parse(text) {
        Ok(config) => panic!("expected problems, got a config: {config:#?}\n--- text ---\n{text}"),
        Err(error) => error.problems,
    }
}

/// Asserts that parsing `text` reports a problem at exactly `location` / `field` whose
/// reason contains `reason_part`.
fn assert_problem(text: &str, location: &str, field: &str, reason_part: &str) {
    let problems = problems_of(text);
    assert!(
        problems.iter().any(|problem| problem.location == location
            && problem.field == field
            && problem.reason.contains(reason_part)),
        "no problem `{location}: {field}: ...{reason_part}...` among:\n{}",
        ConfigError { problems }
    );
}

fn parse_ok(text: &str) -> Config {
    Config::parse(text).unwrap_or_else(|error| {
        panic!("expected a valid config, got:\n{error}\n--- text ---\n{text}")
    })
}

// ---- the good config, defaults and round trip ----

#[test]
fn good_config_parses_into_the_model() {
    let config = parse_ok(GOOD);
    let agent = &config.agent;
    assert_eq!(agent.interfaces, ["eth0", "eth1"]);
    assert_eq!(agent.xdp_mode, XdpMode::Driver);
    assert_eq!(
        agent.edge_addresses,
        [ip("192.0.2.10"), ip("192.0.2.11"), ip("2001:db8::10")]
    );
    assert_eq!(
        agent.pass,
        [
            PortSpec {
                protocol: Protocol::Tcp,
                ports: PortRange { low: 22, high: 22 }
            },
            PortSpec {
                protocol: Protocol::Udp,
                ports: PortRange {
                    low: 5353,
                    high: 5353
                }
            },
        ]
    );
    assert_eq!(
        agent.metrics_listen,
        Some("127.0.0.1:9477".parse::<SocketAddr>().expect("addr"))
    );
    assert_eq!(
        agent.event_log.as_deref(),
        Some("/var/log/forwarder/events.jsonl")
    );
    assert_eq!(agent.udp_idle_timeout, Duration::from_secs(45));
    assert_eq!(
        agent.udp_nat_ports,
        PortRange {
            low: 30000,
            high: 39999
        }
    );
    assert_eq!(agent.tcp_idle_timeout, Duration::from_secs(5400));
    assert_eq!(config.firewall.default, RuleAction::Block);

    assert_eq!(config.access_rules.len(), 3);
    let single = &config.access_rules[1];
    assert_eq!(
        (single.mode, single.target, single.value.as_str()),
        (RuleAction::Block, RuleTarget::Ip, "198.51.100.7")
    );
    assert_eq!((single.addr, single.prefix_len), (ip("198.51.100.7"), 32));
    assert_eq!(
        (
            config.access_rules[2].addr,
            config.access_rules[2].prefix_len
        ),
        (ip("2001:db8:100::"), 48)
    );

    let ids: Vec<&str> = config.apps.iter().map(|app| app.id.as_str()).collect();
    assert_eq!(ids, ["game", "game-v6", "ssh-bastion", "tcp-6000-6010"]);
    let game = &config.apps[0];
    assert_eq!(
        (game.protocol, game.ports),
        (
            Protocol::Udp,
            PortRange {
                low: 27015,
                high: 27015
            }
        )
    );
    assert_eq!(game.edge_ips, [ip("192.0.2.10")]);
    assert_eq!(
        game.origins[1],
        Origin {
            addr: ip("10.0.0.6"),
            ports: PortRange {
                low: 27015,
                high: 27015
            },
            weight: 1,
        }
    );
    assert_eq!(game.proxy_protocol, ProxyProtocol::Simple);
    assert!(game.ip_firewall);
    assert_eq!(game.family(), Some(IpFamily::V4));
    let ssh = &config.apps[2];
    assert!(!ssh.ip_firewall);
    assert_eq!(ssh.family(), None, "a TCP app may mix origin families");
    let range = &config.apps[3];
    assert_eq!(range.proxy_protocol, ProxyProtocol::V1);
    assert!(range.ip_firewall, "ip_firewall defaults to true");
}

#[test]
fn good_config_round_trips_through_to_toml() {
    let config = parse_ok(GOOD);
    let written = config.to_toml();
    let reparsed = parse_ok(&written);
    assert_eq!(reparsed, config, "--- written ---\n{written}");
    // Writing is stable: the second round gives the same text.
    assert_eq!(reparsed.to_toml(), written);
}

#[test]
fn minimal_config_gets_every_default() {
    let config = parse_ok(&with_agent(
        "[[apps]]\nprotocol = \"udp/27015\"\norigin_direct = [\"udp://10.0.0.5:27015\"]\n",
    ));
    assert_eq!(
        config.agent,
        AgentConfig {
            interfaces: vec!["eth0".to_string()],
            xdp_mode: XdpMode::Auto,
            edge_addresses: Vec::new(),
            pass: Vec::new(),
            metrics_listen: None,
            event_log: None,
            udp_idle_timeout: Duration::from_secs(30),
            udp_nat_ports: PortRange {
                low: 40000,
                high: 59999
            },
            udp_new_flows_per_source: None,
            tcp_idle_timeout: Duration::from_secs(3600),
            tcp_splice: TcpSplice::Auto,
            tcp_engine: TcpEngine::Auto,
        }
    );
    assert_eq!(config.firewall.default, RuleAction::Allow);
    assert!(config.access_rules.is_empty());
    let app = &config.apps[0];
    assert_eq!(app.id, "udp-27015");
    assert!(app.edge_ips.is_empty());
    assert_eq!(app.proxy_protocol, ProxyProtocol::Off);
    assert!(app.ip_firewall);
    // The minimal config round-trips too (with defaults written out).
    assert_eq!(parse_ok(&config.to_toml()), config);
}

#[test]
fn default_id_of_a_range_app_names_the_range() {
    let config = parse_ok(&with_agent(
        "[[apps]]\nprotocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.0.5:6000-6010\"]\n",
    ));
    assert_eq!(config.apps[0].id, "tcp-6000-6010");
}

#[test]
fn agent_only_config_is_valid() {
    let config = parse_ok(AGENT);
    assert!(config.apps.is_empty());
}

// ---- TOML level ----

#[test]
fn syntax_error_names_its_line() {
    let problems = problems_of("[agent]\ninterfaces = [\"eth0\"\nxdp_mode = \"auto\"\n");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].location.as_str(), problems[0].field.as_str()),
        ("config", "")
    );
    assert!(
        problems[0]
            .reason
            .starts_with("TOML syntax error (line 3, column 1)"),
        "{}",
        problems[0]
    );
}

#[test]
fn unknown_keys_are_errors_in_every_table() {
    let text = "\
colour = \"red\"
[agent]
interfaces = [\"eth0\"]
interface = \"eth1\"
[firewall]
default = \"allow\"
policy = \"drop\"
[[access_rules]]
mode = \"block\"
target = \"ip\"
value = \"192.0.2.1\"
note = \"x\"
[[apps]]
id = \"game\"
protocol = \"udp/27015\"
origin_direct = [\"udp://10.0.0.5:27015\"]
origin_dns = \"game.example.com\"
";
    let problems = problems_of(text);
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(
        lines[0]
            .starts_with("config: colour: unknown key (line 1); expected one of: agent, firewall"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(
            "agent: interface: unknown key (line 4); expected one of: interfaces, xdp_mode"
        ),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("firewall: policy: unknown key (line 7)"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("access_rules[0]: note: unknown key (line 12)"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].starts_with("app 'game' (apps[0]): origin_dns: unknown key (line 17)"),
        "{}",
        lines[4]
    );
}

#[test]
fn every_problem_is_collected_not_just_the_first() {
    let text = with_agent(
        "\
[[apps]]
id = \"a\"
protocol = \"udp/27015\"
origin_direct = [\"tcp://10.0.0.5:27015\"]
proxy_protocol = \"v1\"
colour = \"blue\"

[[apps]]
id = \"b\"
protocol = \"tcp/99999\"
origin_direct = [\"tcp://10.0.0.5:22\"]
",
    );
    let problems = problems_of(&text);
    let fields: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.location.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("app 'a' (apps[0])", "colour"),
            ("app 'a' (apps[0])", "origin_direct"),
            ("app 'a' (apps[0])", "proxy_protocol"),
            ("app 'b' (apps[1])", "protocol"),
        ],
        "{}",
        ConfigError {
            problems: problems.clone()
        }
    );
}

#[test]
fn wrong_value_type_names_field_and_line() {
    let text = with_agent(
        "[[apps]]\nid = \"game\"\nprotocol = \"udp/1\"\norigin_direct = [\"udp://10.0.0.5:1\"]\nip_firewall = \"yes\"\n",
    );
    assert_problem(
        &text,
        "app 'game' (apps[0])",
        "ip_firewall",
        "invalid type: string \"yes\", expected a boolean (line 8)",
    );
    let text = "[agent]\ninterfaces = \"eth0\"\n";
    assert_problem(text, "agent", "interfaces", "expected a sequence (line 2)");
}

#[test]
fn apps_must_be_an_array_of_tables() {
    assert_problem(
        &with_agent("[apps]\nprotocol = \"tcp/1\"\n"),
        "config",
        "apps",
        "expected an array of tables ([[apps]])",
    );
}

// ---- [agent] ----

#[test]
fn agent_table_and_interfaces_are_required() {
    assert_problem("", "agent", "", "missing [agent] table");
    assert_problem("[agent]\n", "agent", "interfaces", "missing");
    assert_problem("[agent]\ninterfaces = []\n", "agent", "interfaces", "empty");
}

#[test]
fn interface_names_are_checked() {
    assert_problem(
        "[agent]\ninterfaces = [\"eth0\", \"eth0\"]\n",
        "agent",
        "interfaces",
        "'eth0' is listed more than once",
    );
    assert_problem(
        "[agent]\ninterfaces = [\"a-very-long-interface\"]\n",
        "agent",
        "interfaces",
        "longer than 15 bytes",
    );
    assert_problem(
        "[agent]\ninterfaces = [\"eth 0\"]\n",
        "agent",
        "interfaces",
        "'eth 0' is not a valid interface name",
    );
    assert_problem(
        "[agent]\ninterfaces = [\"\"]\n",
        "agent",
        "interfaces",
        "empty",
    );
}

#[test]
fn xdp_mode_is_a_keyword() {
    assert_problem(
        &format!("{AGENT}xdp_mode = \"native\"\n"),
        "agent",
        "xdp_mode",
        "'native' is not one of auto, driver, skb",
    );
}

#[test]
fn edge_addresses_must_parse() {
    assert_problem(
        &format!("{AGENT}edge_addresses = [\"192.0.2.300\"]\n"),
        "agent",
        "edge_addresses",
        "'192.0.2.300' is not an IPv4 or IPv6 address",
    );
    assert_problem(
        &format!("{AGENT}edge_addresses = [\"0.0.0.0\"]\n"),
        "agent",
        "edge_addresses",
        "unspecified or multicast",
    );
    assert_problem(
        &format!("{AGENT}edge_addresses = [\"192.0.2.1\", \"192.0.2.1\"]\n"),
        "agent",
        "edge_addresses",
        "listed more than once",
    );
}

/// IPv4-mapped IPv6 addresses are the IPv4 addresses they carry: the same checks,
/// the same duplicates.
#[test]
fn mapped_ipv6_addresses_are_judged_as_ipv4() {
    assert_problem(
        &format!("{AGENT}edge_addresses = [\"::ffff:0.0.0.0\"]\n"),
        "agent",
        "edge_addresses",
        "unspecified or multicast",
    );
    assert_problem(
        &format!("{AGENT}edge_addresses = [\"::ffff:224.0.0.1\"]\n"),
        "agent",
        "edge_addresses",
        "unspecified or multicast",
    );
    assert_problem(
        &format!("{AGENT}edge_addresses = [\"192.0.2.1\", \"::ffff:192.0.2.1\"]\n"),
        "agent",
        "edge_addresses",
        "192.0.2.1 is listed more than once",
    );
    assert_problem(
        &format!(
            "{AGENT}[[apps]]\nprotocol = \"udp/53\"\norigin_direct = [\"udp://[::ffff:127.0.0.1]:53\"]\n"
        ),
        "app 'udp-53' (apps[0])",
        "origin_direct",
        "127.0.0.1 is a loopback address",
    );
    let config = parse_ok(&format!(
        "{AGENT}edge_addresses = [\"::ffff:192.0.2.1\"]\n[[apps]]\nprotocol = \"udp/53\"\norigin_direct = [\"udp://[::ffff:10.0.0.5]:53\"]\n"
    ));
    assert_eq!(
        config.agent.edge_addresses,
        ["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        config.apps[0].origins[0].addr,
        "10.0.0.5".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn mapped_ipv6_access_rules_are_ipv4_rules() {
    let prefix: crate::config::model::Prefix = "::ffff:198.51.100.0/120".parse().unwrap();
    assert_eq!(
        (prefix.addr, prefix.len),
        ("198.51.100.0".parse::<IpAddr>().unwrap(), 24)
    );
    let prefix: crate::config::model::Prefix = "::ffff:198.51.100.7".parse().unwrap();
    assert_eq!(
        (prefix.addr, prefix.len),
        ("198.51.100.7".parse::<IpAddr>().unwrap(), 32)
    );
}

/// Whatever `run` would refuse, `check-config` refuses first: an SPP app and a NAT
/// app sharing a UDP origin port, and more port entries than the datapath holds.
#[test]
fn check_config_refuses_what_the_datapath_cannot_hold() {
    assert_problem(
        &format!(
            "{AGENT}[[apps]]\nid = \"a\"\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.0.5:9000\"]\nproxy_protocol = \"simple\"\n\
             [[apps]]\nid = \"b\"\nprotocol = \"udp/5001\"\norigin_direct = [\"udp://10.0.0.5:8990-9010\"]\nedge_ips = []\n"
        ),
        "app 'b' (apps[1])",
        "origin_direct",
        "shares UDP origin 10.0.0.5 port(s) 8990-9010 with app 'a' (apps[0])",
    );
    // Two SPP apps may share it (the flow in the header tells them apart).
    parse_ok(&format!(
        "{AGENT}[[apps]]\nid = \"a\"\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.0.5:9000\"]\nproxy_protocol = \"simple\"\n\
         [[apps]]\nid = \"b\"\nprotocol = \"udp/5001\"\norigin_direct = [\"udp://10.0.0.5:9000\"]\nproxy_protocol = \"simple\"\n"
    ));
    // 20 edge addresses × 55,536 ports > 1,048,576 entries.
    let edges: Vec<String> = (1..=20).map(|i| format!("\"192.0.2.{i}\"")).collect();
    assert_problem(
        &format!(
            "[agent]\ninterfaces = [\"eth0\"]\nedge_addresses = [{}]\n\
             [[apps]]\nprotocol = \"tcp/10000-65535\"\norigin_direct = [\"tcp://10.0.0.5:10000-65535\"]\n",
            edges.join(", ")
        ),
        "apps",
        "protocol",
        "need 1110720 (edge address, protocol, port) entries; the datapath holds 1048576",
    );
}

#[test]
fn ports_with_leading_zeros_are_refused() {
    assert_problem(
        &format!(
            "{AGENT}[[apps]]\nprotocol = \"tcp/080\"\norigin_direct = [\"tcp://10.0.0.5:80\"]\n"
        ),
        "apps[0]",
        "protocol",
        "'080' has a leading zero; write the port as 80",
    );
}

#[test]
fn an_id_with_a_newline_is_escaped_in_the_report() {
    let problems = problems_of(&format!(
        "{AGENT}[[apps]]\nid = \"web\\nerror: forged\"\nprotocol = \"tcp/80\"\norigin_direct = [\"tcp://10.0.0.5:80\"]\n"
    ));
    let report = ConfigError {
        problems: problems.clone(),
    }
    .to_string();
    assert!(
        problems
            .iter()
            .any(|p| p.field == "id" && p.reason.contains("control characters")),
        "{report}"
    );
    assert!(
        !report.lines().any(|l| l.starts_with("error: forged")),
        "no forged line:\n{report}"
    );
    assert!(report.contains("web\\nerror: forged"), "escaped:\n{report}");
}

#[test]
fn pass_entries_must_parse() {
    assert_problem(
        &format!("{AGENT}pass = [\"ssh/22\"]\n"),
        "agent",
        "pass",
        "'ssh' is not one of tcp, udp",
    );
    assert_problem(
        &format!("{AGENT}pass = [\"22\"]\n"),
        "agent",
        "pass",
        "is not PROTO/PORT or PROTO/LOW-HIGH",
    );
}

#[test]
fn pass_may_not_overlap_an_app() {
    let text = format!(
        "{AGENT}pass = [\"tcp/20-25\", \"udp/22\"]\n[[apps]]\nid = \"ssh\"\nprotocol = \"tcp/22\"\norigin_direct = [\"tcp://10.0.0.5:22\"]\n"
    );
    let problems = problems_of(&text);
    assert_eq!(
        problems.len(),
        1,
        "udp/22 does not overlap a TCP app: {problems:?}"
    );
    assert_eq!(
        problems[0].to_string(),
        "agent: pass: tcp/20-25 overlaps app 'ssh' (apps[0]) (tcp/22)"
    );
}

#[test]
fn metrics_listen_is_a_socket_address() {
    assert_problem(
        &format!("{AGENT}metrics_listen = \"localhost:9477\"\n"),
        "agent",
        "metrics_listen",
        "is not IP:PORT",
    );
    assert_problem(
        &format!("{AGENT}metrics_listen = \"127.0.0.1\"\n"),
        "agent",
        "metrics_listen",
        "is not IP:PORT",
    );
    assert_problem(
        &format!("{AGENT}metrics_listen = \"127.0.0.1:0\"\n"),
        "agent",
        "metrics_listen",
        "port other than 0",
    );
    let config = parse_ok(&format!("{AGENT}metrics_listen = \"[::1]:9477\"\n"));
    assert_eq!(
        config.agent.metrics_listen,
        Some("[::1]:9477".parse().expect("addr"))
    );
}

#[test]
fn event_log_may_not_be_empty() {
    assert_problem(
        &format!("{AGENT}event_log = \"\"\n"),
        "agent",
        "event_log",
        "empty",
    );
    assert_eq!(
        parse_ok(&format!("{AGENT}event_log = \"-\"\n"))
            .agent
            .event_log
            .as_deref(),
        Some("-")
    );
}

#[test]
fn durations_parse_and_are_positive() {
    assert_problem(
        &format!("{AGENT}udp_idle_timeout = \"30\"\n"),
        "agent",
        "udp_idle_timeout",
        "'30' has no unit",
    );
    assert_problem(
        &format!("{AGENT}tcp_idle_timeout = \"0s\"\n"),
        "agent",
        "tcp_idle_timeout",
        "must be greater than 0",
    );
    assert_problem(
        &format!("{AGENT}tcp_idle_timeout = \"1 hour\"\n"),
        "agent",
        "tcp_idle_timeout",
        "unknown unit",
    );
    let config = parse_ok(&format!(
        "{AGENT}udp_idle_timeout = \"500ms\"\ntcp_idle_timeout = \"5m\"\n"
    ));
    assert_eq!(config.agent.udp_idle_timeout, Duration::from_millis(500));
    assert_eq!(config.agent.tcp_idle_timeout, Duration::from_secs(300));
}

#[test]
fn tcp_splice_takes_auto_on_off() {
    for (text, want) in [
        ("auto", TcpSplice::Auto),
        ("on", TcpSplice::On),
        ("off", TcpSplice::Off),
    ] {
        let config = parse_ok(&format!("{AGENT}tcp_splice = \"{text}\"\n"));
        assert_eq!(config.agent.tcp_splice, want);
        assert_eq!(want.splices(), want == TcpSplice::On);
    }
    assert_problem(
        &format!("{AGENT}tcp_splice = \"yes\"\n"),
        "agent",
        "tcp_splice",
        "'yes' is not one of auto, on, off",
    );
}

#[test]
fn tcp_engine_takes_auto_epoll_io_uring() {
    assert_eq!(parse_ok(AGENT).agent.tcp_engine, TcpEngine::Auto);
    for (text, want) in [
        ("auto", TcpEngine::Auto),
        ("epoll", TcpEngine::Epoll),
        ("io_uring", TcpEngine::IoUring),
    ] {
        let config = parse_ok(&format!("{AGENT}tcp_engine = \"{text}\"\n"));
        assert_eq!(config.agent.tcp_engine, want);
    }
    assert_problem(
        &format!("{AGENT}tcp_engine = \"uring\"\n"),
        "agent",
        "tcp_engine",
        "'uring' is not one of auto, epoll, io_uring",
    );
}

#[test]
fn splicing_needs_the_epoll_engine() {
    assert_problem(
        &format!("{AGENT}tcp_engine = \"io_uring\"\ntcp_splice = \"on\"\n"),
        "agent",
        "tcp_splice",
        "\"on\" needs tcp_engine = \"epoll\"",
    );
    // `auto` gives way to the splice; copying is every engine's.
    let config = parse_ok(&format!("{AGENT}tcp_splice = \"on\"\n"));
    assert!(
        !config
            .agent
            .tcp_engine
            .tries_io_uring(config.agent.tcp_splice)
    );
    let config = parse_ok(&format!(
        "{AGENT}tcp_engine = \"io_uring\"\ntcp_splice = \"off\"\n"
    ));
    assert!(
        config
            .agent
            .tcp_engine
            .tries_io_uring(config.agent.tcp_splice)
    );
    assert!(TcpEngine::Auto.tries_io_uring(TcpSplice::Auto));
    assert!(!TcpEngine::Epoll.tries_io_uring(TcpSplice::Off));
}

#[test]
fn udp_nat_ports_is_a_port_range() {
    assert_problem(
        &format!("{AGENT}udp_nat_ports = \"50000-40000\"\n"),
        "agent",
        "udp_nat_ports",
        "range '50000-40000' is reversed",
    );
    assert_problem(
        &format!("{AGENT}udp_nat_ports = \"0-100\"\n"),
        "agent",
        "udp_nat_ports",
        "port 0 is not allowed",
    );
}

#[test]
fn udp_new_flows_per_source_is_a_positive_count() {
    assert_eq!(
        parse_ok(&format!("{AGENT}udp_new_flows_per_source = 50\n"))
            .agent
            .udp_new_flows_per_source,
        Some(50)
    );
    assert_eq!(parse_ok(AGENT).agent.udp_new_flows_per_source, None);
    for bad in ["0", "-5", "1000001"] {
        assert_problem(
            &format!("{AGENT}udp_new_flows_per_source = {bad}\n"),
            "agent",
            "udp_new_flows_per_source",
            "out of range",
        );
    }
    assert_problem(
        &format!("{AGENT}udp_new_flows_per_source = \"50\"\n"),
        "agent",
        "udp_new_flows_per_source",
        "",
    );
}

#[test]
fn udp_new_flows_per_second_is_a_positive_count_for_udp_apps() {
    let app = |protocol: &str, n: &str| {
        with_agent(&format!(
            "[[apps]]\nid = \"a\"\nprotocol = \"{protocol}/5000\"\n\
             origin_direct = [\"{protocol}://10.0.0.2:5000\"]\nudp_new_flows_per_second = {n}\n"
        ))
    };
    assert_eq!(
        parse_ok(&app("udp", "200")).apps[0].udp_new_flows_per_second,
        Some(200)
    );
    for bad in ["0", "-1", "1000001"] {
        assert_problem(
            &app("udp", bad),
            "app 'a' (apps[0])",
            "udp_new_flows_per_second",
            "out of range",
        );
    }
    assert_problem(
        &app("tcp", "200"),
        "app 'a' (apps[0])",
        "udp_new_flows_per_second",
        "UDP apps only",
    );
}

#[test]
fn tcp_fastpath_is_off_by_default_and_xdp_for_tcp_apps_only() {
    let app = |protocol: &str, line: &str| {
        with_agent(&format!(
            "[[apps]]\nid = \"a\"\nprotocol = \"{protocol}/5000\"\n\
             origin_direct = [\"{protocol}://10.0.0.2:5000\"]\n{line}\n"
        ))
    };
    assert_eq!(
        parse_ok(&app("tcp", "")).apps[0].tcp_fastpath,
        TcpFastpath::Off
    );
    let on = parse_ok(&app("tcp", "tcp_fastpath = \"xdp\""));
    assert_eq!(on.apps[0].tcp_fastpath, TcpFastpath::Xdp);
    // The key survives the round trip through TOML; off is not written.
    let text = on.to_toml();
    assert!(text.contains("tcp_fastpath = \"xdp\""), "{text}");
    assert_eq!(parse_ok(&text).apps[0].tcp_fastpath, TcpFastpath::Xdp);
    assert!(!parse_ok(&app("tcp", "")).to_toml().contains("tcp_fastpath"));
    assert_problem(
        &app("tcp", "tcp_fastpath = \"ebpf\""),
        "app 'a' (apps[0])",
        "tcp_fastpath",
        "'ebpf' is not one of off, xdp",
    );
    assert_problem(
        &app("udp", "tcp_fastpath = \"xdp\""),
        "app 'a' (apps[0])",
        "tcp_fastpath",
        "TCP apps only",
    );
}

#[test]
fn the_datapath_capacities_are_checked_before_run() {
    let apps = |n: usize| {
        (0..n)
            .map(|i| {
                format!(
                    "[[apps]]\nprotocol = \"tcp/{}\"\norigin_direct = [\"tcp://10.0.0.2:{}\"]\n",
                    i + 1,
                    i + 1
                )
            })
            .collect::<String>()
    };
    let max_apps = forwarder_common::MAX_APPS as usize;
    parse_ok(&with_agent(&apps(max_apps)));
    assert_problem(
        &with_agent(&apps(max_apps + 1)),
        "apps",
        "id",
        "the datapath holds at most 4096",
    );
    let rules = block_rules;
    let max_rules = forwarder_common::MAX_RULES as usize;
    assert_problem(
        &with_agent(&rules(max_rules + 1)),
        "access_rules",
        "value",
        "the datapath holds at most 16384",
    );
}

#[test]
fn udp_nat_ports_may_not_overlap_udp_apps_or_pass() {
    let text = format!(
        "{AGENT}pass = [\"udp/45000\"]\n[[apps]]\nid = \"dns\"\nprotocol = \"udp/40000-40010\"\norigin_direct = [\"udp://10.0.0.5:40000-40010\"]\n"
    );
    assert_problem(
        &text,
        "agent",
        "udp_nat_ports",
        "40000-59999 overlaps app 'dns' (apps[0]) (udp/40000-40010)",
    );
    assert_problem(
        &text,
        "agent",
        "udp_nat_ports",
        "40000-59999 overlaps the pass entry udp/45000",
    );
    // TCP apps may use those ports.
    parse_ok(&format!(
        "{AGENT}[[apps]]\nprotocol = \"tcp/45000\"\norigin_direct = [\"tcp://10.0.0.5:45000\"]\n"
    ));
}

#[test]
fn firewall_default_is_allow_or_block() {
    assert_problem(
        &format!("{AGENT}[firewall]\ndefault = \"deny\"\n"),
        "firewall",
        "default",
        "'deny' is not one of allow, block",
    );
}

// ---- [[apps]] ----

fn app(body: &str) -> String {
    with_agent(&format!("[[apps]]\nid = \"game\"\n{body}"))
}

const GAME: &str = "app 'game' (apps[0])";

#[test]
fn protocol_is_required_and_parsed() {
    assert_problem(
        &app("origin_direct = [\"udp://10.0.0.5:1\"]\n"),
        GAME,
        "protocol",
        "missing",
    );
    for (protocol, reason) in [
        ("udp/0", "port 0 is not allowed (ports are 1-65535)"),
        (
            "udp/65536",
            "port 65536 is out of range (ports are 1-65535)",
        ),
        ("udp/90-80", "range '90-80' is reversed"),
        ("udp/abc", "'abc' is not a port number"),
        ("udp/1-", "'' is not a port number"),
        ("sctp/22", "'sctp' is not one of tcp, udp"),
        ("UDP/22", "'UDP' is not one of tcp, udp"),
        ("udp27015", "is not PROTO/PORT or PROTO/LOW-HIGH"),
    ] {
        assert_problem(
            &app(&format!(
                "protocol = \"{protocol}\"\norigin_direct = [\"udp://10.0.0.5:1\"]\n"
            )),
            GAME,
            "protocol",
            reason,
        );
    }
}

#[test]
fn an_app_without_id_and_protocol_is_named_by_index() {
    let text = with_agent("[[apps]]\norigin_direct = [\"udp://10.0.0.5:1\"]\n");
    assert_problem(&text, "apps[0]", "protocol", "missing");
    // With a readable protocol, the default id names it.
    let text =
        with_agent("[[apps]]\nprotocol = \"udp/1\"\norigin_direct = [\"tcp://10.0.0.5:1\"]\n");
    assert_problem(
        &text,
        "app 'udp-1' (apps[0])",
        "origin_direct",
        "scheme 'tcp' does not match protocol 'udp'",
    );
}

#[test]
fn id_may_not_be_empty() {
    let text = with_agent(
        "[[apps]]\nid = \"\"\nprotocol = \"udp/1\"\norigin_direct = [\"udp://10.0.0.5:1\"]\n",
    );
    assert_problem(&text, "app '' (apps[0])", "id", "empty");
}

#[test]
fn origin_direct_is_required_and_non_empty() {
    assert_problem(
        &app("protocol = \"udp/1\"\n"),
        GAME,
        "origin_direct",
        "missing",
    );
    assert_problem(
        &app("protocol = \"udp/1\"\norigin_direct = []\n"),
        GAME,
        "origin_direct",
        "empty",
    );
}

#[test]
fn origin_scheme_must_match_protocol() {
    let problems = problems_of(&app(
        "protocol = \"udp/27015\"\norigin_direct = [\"tcp://10.0.0.5:27015\"]\n",
    ));
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0].to_string(),
        "app 'game' (apps[0]): origin_direct: scheme 'tcp' does not match protocol 'udp'"
    );
}

#[test]
fn origin_urls_must_parse() {
    for (origin, reason) in [
        ("10.0.0.5:1", "is not SCHEME://IP:PORT"),
        ("http://10.0.0.5:1", "unknown scheme 'http'"),
        (
            "udp://game.example.com:1",
            "is not an IP address (host names / origin_dns are not supported)",
        ),
        ("udp://2001:db8::5:1", "must be in brackets"),
        ("udp://[2001:db8::5:1", "missing ']'"),
        ("udp://[2001:db8::5]", "missing :PORT"),
        ("udp://10.0.0.5", "missing :PORT"),
        ("udp://10.0.0.5:0", "port 0 is not allowed"),
        ("udp://0.0.0.0:1", "not a unicast origin address"),
        ("udp://255.255.255.255:1", "not a unicast origin address"),
        (
            "udp://127.0.0.1:1",
            "loopback address, which XDP cannot forward UDP to",
        ),
    ] {
        assert_problem(
            &app(&format!(
                "protocol = \"udp/1\"\norigin_direct = [\"{origin}\"]\n"
            )),
            GAME,
            "origin_direct",
            reason,
        );
    }
    // A TCP origin on loopback is fine: the agent connects to it from userspace.
    parse_ok(&app(
        "protocol = \"tcp/1\"\norigin_direct = [\"tcp://127.0.0.1:1\"]\n",
    ));
}

#[test]
fn origin_range_must_match_edge_range_length() {
    assert_problem(
        &app("protocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.0.5:7000-7005\"]\n"),
        GAME,
        "origin_direct",
        "'tcp://10.0.0.5:7000-7005' has 6 port(s) but the app's edge range 6000-6010 has 11",
    );
    // Strict: one origin port for an edge range is refused too.
    assert_problem(
        &app("protocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.0.5:7000\"]\n"),
        GAME,
        "origin_direct",
        "has 1 port(s) but the app's edge range 6000-6010 has 11",
    );
    assert_problem(
        &app("protocol = \"tcp/6000\"\norigin_direct = [\"tcp://10.0.0.5:7000-7001\"]\n"),
        GAME,
        "origin_direct",
        "has 2 port(s) but the app's edge range 6000 has 1",
    );
}

#[test]
fn origins_may_not_repeat() {
    assert_problem(
        &app(
            "protocol = \"tcp/1\"\norigin_direct = [\"tcp://10.0.0.5:1\", \"tcp://10.0.0.5:1\"]\n",
        ),
        GAME,
        "origin_direct",
        "'tcp://10.0.0.5:1' is listed more than once",
    );
}

#[test]
fn origin_port_maps_by_offset() {
    let config = parse_ok(&app(
        "protocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.0.5:7000-7010\", \"tcp://[2001:db8::5]:8100-8110\"]\n",
    ));
    let range_app = &config.apps[0];
    assert_eq!(range_app.origin_port(&range_app.origins[0], 6000), 7000);
    assert_eq!(range_app.origin_port(&range_app.origins[0], 6007), 7007);
    assert_eq!(range_app.origin_port(&range_app.origins[1], 6010), 8110);
    assert_eq!(
        range_app.origins[1].to_url(Protocol::Tcp),
        "tcp://[2001:db8::5]:8100-8110"
    );
    let single = parse_ok(&app(
        "protocol = \"udp/27015\"\norigin_direct = [\"udp://10.0.0.5:28015\"]\n",
    ));
    assert_eq!(
        single.apps[0].origin_port(&single.apps[0].origins[0], 27015),
        28015
    );
}

#[test]
fn proxy_protocol_must_suit_the_protocol() {
    assert_problem(
        &app(
            "protocol = \"udp/1\"\norigin_direct = [\"udp://10.0.0.5:1\"]\nproxy_protocol = \"v1\"\n",
        ),
        GAME,
        "proxy_protocol",
        "'v1' is TCP only",
    );
    assert_problem(
        &app(
            "protocol = \"tcp/1\"\norigin_direct = [\"tcp://10.0.0.5:1\"]\nproxy_protocol = \"simple\"\n",
        ),
        GAME,
        "proxy_protocol",
        "'simple' is UDP only",
    );
    assert_problem(
        &app(
            "protocol = \"tcp/1\"\norigin_direct = [\"tcp://10.0.0.5:1\"]\nproxy_protocol = \"v3\"\n",
        ),
        GAME,
        "proxy_protocol",
        "'v3' is not one of off, v1, v2, simple",
    );
    for protocol in ["tcp", "udp"] {
        let config = parse_ok(&app(&format!(
            "protocol = \"{protocol}/1\"\norigin_direct = [\"{protocol}://10.0.0.5:1\"]\nproxy_protocol = \"v2\"\n"
        )));
        assert_eq!(config.apps[0].proxy_protocol, ProxyProtocol::V2);
    }
}

fn two_apps(first: &str, second: &str) -> String {
    with_agent(&format!(
        "[[apps]]\nid = \"a\"\n{first}\n[[apps]]\nid = \"b\"\n{second}"
    ))
}

#[test]
fn apps_may_not_claim_the_same_protocol_address_and_port() {
    let text = two_apps(
        "protocol = \"tcp/6000-6010\"\norigin_direct = [\"tcp://10.0.0.5:6000-6010\"]\n",
        "protocol = \"tcp/6010-6020\"\norigin_direct = [\"tcp://10.0.0.6:6010-6020\"]\n",
    );
    assert_problem(
        &text,
        "app 'b' (apps[1])",
        "protocol",
        "tcp/6010-6020 overlaps app 'a' (apps[0]) (tcp/6000-6010) on every edge address",
    );
    // One app on all addresses, one on a single address.
    let text = two_apps(
        "protocol = \"udp/53\"\norigin_direct = [\"udp://10.0.0.5:53\"]\n",
        "protocol = \"udp/53\"\nedge_ips = [\"192.0.2.1\"]\norigin_direct = [\"udp://10.0.0.6:53\"]\n",
    );
    assert_problem(
        &text,
        "app 'b' (apps[1])",
        "protocol",
        "udp/53 overlaps app 'a' (apps[0]) (udp/53) on 192.0.2.1",
    );
    // Shared explicit address.
    let text = two_apps(
        "protocol = \"tcp/80\"\nedge_ips = [\"192.0.2.1\", \"192.0.2.2\"]\norigin_direct = [\"tcp://10.0.0.5:80\"]\n",
        "protocol = \"tcp/80\"\nedge_ips = [\"192.0.2.2\", \"192.0.2.3\"]\norigin_direct = [\"tcp://10.0.0.6:80\"]\n",
    );
    assert_problem(&text, "app 'b' (apps[1])", "protocol", "on 192.0.2.2");
}

#[test]
fn apps_on_disjoint_addresses_or_protocols_may_share_a_port() {
    parse_ok(&two_apps(
        "protocol = \"tcp/80\"\nedge_ips = [\"192.0.2.1\"]\norigin_direct = [\"tcp://10.0.0.5:80\"]\n",
        "protocol = \"tcp/80\"\nedge_ips = [\"192.0.2.2\"]\norigin_direct = [\"tcp://10.0.0.6:80\"]\n",
    ));
    parse_ok(&two_apps(
        "protocol = \"tcp/53\"\norigin_direct = [\"tcp://10.0.0.5:53\"]\n",
        "protocol = \"udp/53\"\norigin_direct = [\"udp://10.0.0.5:53\"]\n",
    ));
}

#[test]
fn app_ids_are_unique() {
    let text = two_apps(
        "protocol = \"tcp/1\"\norigin_direct = [\"tcp://10.0.0.5:1\"]\n",
        "protocol = \"tcp/2\"\norigin_direct = [\"tcp://10.0.0.5:2\"]\n",
    )
    .replace("id = \"b\"", "id = \"a\"");
    assert_problem(
        &text,
        "app 'a' (apps[1])",
        "id",
        "'a' is already the id of apps[0]",
    );
    // A default id can collide with an explicit one.
    let text = with_agent(
        "[[apps]]\nid = \"tcp-2\"\nprotocol = \"tcp/1\"\norigin_direct = [\"tcp://10.0.0.5:1\"]\n\
         [[apps]]\nprotocol = \"tcp/2\"\norigin_direct = [\"tcp://10.0.0.5:2\"]\n",
    );
    assert_problem(
        &text,
        "app 'tcp-2' (apps[1])",
        "id",
        "'tcp-2' is already the id of apps[0]",
    );
}

#[test]
fn edge_ips_must_parse_and_be_edge_addresses() {
    assert_problem(
        &app(
            "protocol = \"tcp/1\"\nedge_ips = [\"192.0.2\"]\norigin_direct = [\"tcp://10.0.0.5:1\"]\n",
        ),
        GAME,
        "edge_ips",
        "'192.0.2' is not an IPv4 or IPv6 address",
    );
    let text = format!(
        "{AGENT}edge_addresses = [\"192.0.2.10\"]\n[[apps]]\nid = \"game\"\nprotocol = \"tcp/1\"\nedge_ips = [\"192.0.2.10\", \"192.0.2.99\"]\norigin_direct = [\"tcp://10.0.0.5:1\"]\n"
    );
    let problems = problems_of(&text);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        problems[0].to_string(),
        "app 'game' (apps[0]): edge_ips: 192.0.2.99 is not one of agent.edge_addresses"
    );
}

#[test]
fn udp_apps_keep_one_ip_family() {
    assert_problem(
        &app(
            "protocol = \"udp/1\"\norigin_direct = [\"udp://10.0.0.5:1\", \"udp://[2001:db8::5]:1\"]\n",
        ),
        GAME,
        "origin_direct",
        "a UDP app's origins must share one IP family: 10.0.0.5 is IPv4, 2001:db8::5 is IPv6",
    );
    assert_problem(
        &app(
            "protocol = \"udp/1\"\nedge_ips = [\"2001:db8::10\"]\norigin_direct = [\"udp://10.0.0.5:1\"]\n",
        ),
        GAME,
        "edge_ips",
        "2001:db8::10 is IPv6 but the origins are IPv4; UDP is not translated",
    );
    // TCP may mix: the agent terminates TCP and opens its own connection.
    parse_ok(&app(
        "protocol = \"tcp/1\"\nedge_ips = [\"2001:db8::10\"]\norigin_direct = [\"tcp://10.0.0.5:1\"]\n",
    ));
}

// ---- [[access_rules]] ----

fn rule(mode: &str, target: &str, value: &str) -> String {
    with_agent(&format!(
        "[[access_rules]]\nmode = \"{mode}\"\ntarget = \"{target}\"\nvalue = \"{value}\"\n"
    ))
}

const RULE: &str = "access_rules[0]";

#[test]
fn access_rule_keywords_are_checked() {
    assert_problem(
        &rule("challenge", "ip", "192.0.2.1"),
        RULE,
        "mode",
        "'challenge' is not one of allow, block",
    );
    assert_problem(
        &rule("block", "country", "192.0.2.1"),
        RULE,
        "target",
        "'country' is not one of ip, ip_range",
    );
    assert_problem(
        &with_agent("[[access_rules]]\nvalue = \"192.0.2.1\"\n"),
        RULE,
        "mode",
        "missing",
    );
    assert_problem(
        &with_agent("[[access_rules]]\nvalue = \"192.0.2.1\"\n"),
        RULE,
        "target",
        "missing",
    );
    assert_problem(
        &with_agent("[[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\n"),
        RULE,
        "value",
        "missing",
    );
}

#[test]
fn access_rule_ip_takes_one_address() {
    assert_problem(
        &rule("block", "ip", "192.0.2.0/24"),
        RULE,
        "value",
        "target 'ip' takes one address",
    );
    assert_problem(
        &rule("block", "ip", "192.0.2.256"),
        RULE,
        "value",
        "'192.0.2.256' is not an IPv4 or IPv6 address",
    );
    let config = parse_ok(&rule("block", "ip", "192.0.2.1/32"));
    assert_eq!(
        (
            config.access_rules[0].addr,
            config.access_rules[0].prefix_len
        ),
        (ip("192.0.2.1"), 32)
    );
    let config = parse_ok(&rule("block", "ip", "2001:db8::1"));
    assert_eq!(config.access_rules[0].prefix_len, 128);
}

#[test]
fn access_rule_ip_range_takes_a_prefix() {
    assert_problem(
        &rule("block", "ip_range", "192.0.2.0"),
        RULE,
        "value",
        "target 'ip_range' needs ADDRESS/PREFIX",
    );
    assert_problem(
        &rule("block", "ip_range", "192.0.2.0/33"),
        RULE,
        "value",
        "prefix length '/33' is out of range (0-32 for IPv4)",
    );
    assert_problem(
        &rule("block", "ip_range", "2001:db8::/129"),
        RULE,
        "value",
        "prefix length '/129' is out of range (0-128 for IPv6)",
    );
    assert_problem(
        &rule("block", "ip_range", "192.0.2.0/x"),
        RULE,
        "value",
        "prefix length '/x' is out of range",
    );
    assert_problem(
        &rule("block", "ip_range", "10.0.1.130/25"),
        RULE,
        "value",
        "'10.0.1.130/25' has host bits set; did you mean '10.0.1.128/25'?",
    );
    let config = parse_ok(&rule("allow", "ip_range", "0.0.0.0/0"));
    assert_eq!(config.access_rules[0].prefix_len, 0);
}

#[test]
fn access_rules_may_not_repeat() {
    let text = with_agent(
        "[[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"10.0.0.0/8\"\n\
         [[access_rules]]\nmode = \"allow\"\ntarget = \"ip_range\"\nvalue = \"10.0.0.0/8\"\n\
         [[access_rules]]\nmode = \"block\"\ntarget = \"ip_range\"\nvalue = \"10.0.0.0/8\"\n",
    );
    let problems = problems_of(&text);
    assert_eq!(
        problems.len(),
        1,
        "allow + block of one prefix is fine: {problems:?}"
    );
    assert_eq!(
        problems[0].to_string(),
        "access_rules[2]: value: '10.0.0.0/8' repeats the block rule '10.0.0.0/8'"
    );
    // Messages keep the file's indexes when an earlier rule is invalid.
    let text = with_agent(
        "[[access_rules]]\nmode = \"maybe\"\ntarget = \"ip\"\nvalue = \"192.0.2.1\"\n\
         [[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"192.0.2.9\"\n\
         [[access_rules]]\nmode = \"block\"\ntarget = \"ip\"\nvalue = \"192.0.2.9/32\"\n",
    );
    assert_problem(
        &text,
        "access_rules[2]",
        "value",
        "'192.0.2.9/32' repeats the block rule '192.0.2.9'",
    );
}

#[test]
fn access_rule_matches_its_prefix() {
    let config = parse_ok(&rule("block", "ip_range", "10.0.1.128/25"));
    let rule = &config.access_rules[0];
    assert!(rule.matches(ip("10.0.1.200")));
    assert!(!rule.matches(ip("10.0.1.127")));
    assert!(
        !rule.matches(ip("::ffff:10.0.1.200")),
        "families never match each other"
    );
}

// ---- small types ----

#[test]
fn port_range_and_protocol_helpers() {
    let range: PortRange = "6000-6010".parse().expect("range");
    assert_eq!(
        (range.len(), range.to_string()),
        (11, "6000-6010".to_string())
    );
    assert!(range.contains(6000) && range.contains(6010) && !range.contains(6011));
    assert_eq!(
        PortRange::single(80).map(|single| single.to_string()),
        Some("80".to_string())
    );
    assert_eq!(PortRange::new(0, 1), None);
    assert_eq!(
        "1-65535".parse::<PortRange>().map(|full| full.len()),
        Ok(65535)
    );
    assert_eq!(
        (Protocol::Tcp.ip_proto(), Protocol::Udp.ip_proto()),
        (6, 17)
    );
    assert_eq!(Protocol::Udp.as_str(), "udp");
    assert_eq!(
        "udp/5000-5010"
            .parse::<PortSpec>()
            .map(|spec| spec.to_string()),
        Ok("udp/5000-5010".to_string())
    );
}

#[test]
fn config_error_displays_one_problem_per_line() {
    let error =
        Config::parse("[agent]\ninterfaces = []\nxdp_mode = \"fast\"\n").expect_err("two problems");
    assert_eq!(
        error.to_string(),
        "agent: interfaces: empty; list at least one interface, e.g. [\"eth0\"]\nagent: xdp_mode: 'fast' is not one of auto, driver, skb"
    );
}

#[test]
fn load_reports_an_unreadable_file() {
    let error = Config::load(std::path::Path::new("/nonexistent/forwarder.toml"))
        .expect_err("missing file");
    assert_eq!(error.problems.len(), 1);
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/forwarder.toml: cannot read the config file: No such file"),
        "{error}"
    );
}

// ---- host-side checks (run only) ----

fn host(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<IpAddr>> {
    entries
        .iter()
        .map(|(name, addrs)| {
            (
                name.to_string(),
                addrs.iter().map(|addr| ip(addr)).collect(),
            )
        })
        .collect()
}

#[test]
fn resolve_edge_addresses_defaults_to_interface_addresses() {
    let config = parse_ok("[agent]\ninterfaces = [\"eth1\", \"eth0\"]\n");
    let addrs = host(&[
        ("eth0", &["192.0.2.1", "fe80::1", "2001:db8::1"]),
        ("eth1", &["198.51.100.1"]),
        ("eth2", &["203.0.113.1"]),
    ]);
    assert_eq!(
        config.resolve_edge_addresses(&addrs),
        Ok(vec![ip("198.51.100.1"), ip("192.0.2.1"), ip("2001:db8::1")]),
        "interface order, no link-local, no other interfaces"
    );
}

#[test]
fn resolve_edge_addresses_checks_interfaces_and_addresses() {
    let config = parse_ok(
        "[agent]\ninterfaces = [\"eth0\", \"eth9\"]\nedge_addresses = [\"192.0.2.1\", \"192.0.2.2\"]\n\
         [[apps]]\nid = \"web\"\nprotocol = \"tcp/80\"\nedge_ips = [\"192.0.2.2\"]\norigin_direct = [\"tcp://10.0.0.5:80\"]\n",
    );
    let error = config
        .resolve_edge_addresses(&host(&[("eth0", &["192.0.2.1"])]))
        .expect_err("eth9 is missing");
    assert_eq!(
        error.to_string(),
        "agent: interfaces: interface 'eth9' does not exist on this host"
    );
    let ok = config.resolve_edge_addresses(&host(&[
        ("eth0", &["192.0.2.1"]),
        ("eth9", &["192.0.2.2", "192.0.2.3"]),
    ]));
    assert_eq!(
        ok,
        Ok(vec![ip("192.0.2.1"), ip("192.0.2.2")]),
        "edge_addresses narrows the list"
    );
}

/// An anycast edge address on `lo` (or a dummy) while XDP sits on the physical
/// interfaces is an edge address like any other; one on no interface yet (a VRRP
/// backup) is accepted and listed as absent, for `run` to warn about.
#[test]
fn edge_addresses_may_live_on_any_interface_or_on_none_yet() {
    let config = parse_ok(
        "[agent]\ninterfaces = [\"eth0\"]\n\
         edge_addresses = [\"203.0.113.10\", \"203.0.113.11\", \"203.0.113.12\"]\n\
         [[apps]]\nid = \"web\"\nprotocol = \"tcp/80\"\nedge_ips = [\"203.0.113.12\"]\norigin_direct = [\"tcp://10.0.0.5:80\"]\n",
    );
    let addrs = host(&[
        ("eth0", &["192.0.2.1"]),
        ("lo", &["127.0.0.1", "203.0.113.10"]),
        ("dummy0", &["203.0.113.11"]),
    ]);
    assert_eq!(
        config.resolve_edge_addresses(&addrs),
        Ok(vec![
            ip("203.0.113.10"),
            ip("203.0.113.11"),
            ip("203.0.113.12")
        ])
    );
    assert_eq!(config.absent_edge_addresses(&addrs), [ip("203.0.113.12")]);
    let addrs = host(&[("eth0", &["192.0.2.1"])]);
    assert!(
        config.resolve_edge_addresses(&addrs).is_ok(),
        "absent: accepted"
    );
    assert_eq!(
        config.absent_edge_addresses(&addrs),
        [ip("203.0.113.10"), ip("203.0.113.11"), ip("203.0.113.12")]
    );
}

#[test]
fn resolve_edge_addresses_needs_some_address() {
    let config = parse_ok(AGENT);
    let error = config
        .resolve_edge_addresses(&host(&[("eth0", &["fe80::1"])]))
        .expect_err("no address");
    assert_eq!(error.problems[0].field, "interfaces");
    assert!(
        error.problems[0].reason.contains("carry no usable address"),
        "{error}"
    );
}

// ---- origins: weights and health checks (lb) ----

const WEIGHTED: &str = r#"
[[apps]]
id = "ssh"
protocol = "tcp/22"
origin_direct = ["tcp://10.0.0.5:22", { address = "tcp://10.0.0.6:22", weight = 3 }, { address = "tcp://10.0.0.7:22", weight = 0 }]
[apps.health_check]
interval = "2s"
timeout = "500ms"
rise = 1
fall = 2

[[apps]]
id = "game"
protocol = "udp/27015"
origin_direct = ["udp://10.0.0.8:27015", "udp://10.0.0.9:27015"]
proxy_protocol = "simple"
[apps.health_check]
send_hex = "ffffffff54"
expect = "I"
"#;

#[test]
fn origins_take_weights_and_apps_take_health_checks() {
    let config = parse_ok(&with_agent(WEIGHTED));
    let ssh = &config.apps[0];
    let weights: Vec<u32> = ssh.origins.iter().map(|o| o.weight).collect();
    assert_eq!(weights, [1, 3, 0]);
    let check = ssh.health_check.as_ref().expect("a check");
    assert_eq!(check.interval, Duration::from_secs(2));
    assert_eq!(check.timeout, Duration::from_millis(500));
    assert_eq!((check.rise, check.fall), (1, 2));
    assert_eq!(check.probe, None, "a TCP check is a connect");
    let game = config.apps[1].health_check.as_ref().expect("a check");
    assert_eq!(
        (game.interval, game.timeout, game.rise, game.fall),
        (Duration::from_secs(5), Duration::from_secs(2), 2, 3),
        "defaults"
    );
    let probe = game.probe.as_ref().expect("a probe");
    assert_eq!(probe.send, [0xff, 0xff, 0xff, 0xff, 0x54]);
    assert_eq!(probe.expect, b"I");
    // Weights and checks survive the round trip (weight 1 as a plain URL).
    let written = config.to_toml();
    assert_eq!(parse_ok(&written), config, "--- written ---\n{written}");
    assert!(written.contains("weight = 3"), "{written}");
}

#[test]
fn weights_and_health_checks_are_checked() {
    let app = |origins: &str, check: &str| {
        with_agent(&format!(
            "[[apps]]\nid = \"a\"\nprotocol = \"udp/53\"\norigin_direct = {origins}\n{check}"
        ))
    };
    let one = r#"["udp://10.0.0.2:53"]"#;
    assert_problem(
        &app(r#"[{ address = "udp://10.0.0.2:53", weight = 1001 }]"#, ""),
        "app 'a' (apps[0])",
        "origin_direct",
        "weight 1001 of 'udp://10.0.0.2:53' is out of range: 0 to 1000",
    );
    assert_problem(
        &app(r#"[{ address = "udp://10.0.0.2:53", weight = 0 }]"#, ""),
        "app 'a' (apps[0])",
        "origin_direct",
        "every origin has weight 0",
    );
    assert_problem(
        &app(r#"[{ weight = 2 }]"#, ""),
        "app 'a' (apps[0])",
        "origin_direct",
        "needs `address`",
    );
    assert_problem(
        &app(one, "[apps.health_check]\ninterval = \"1s\"\n"),
        "app 'a' (apps[0])",
        "health_check.send",
        "missing; a UDP app's health check sends a probe",
    );
    assert_problem(
        &app(
            one,
            "[apps.health_check]\nsend = \"x\"\nsend_hex = \"78\"\n",
        ),
        "app 'a' (apps[0])",
        "health_check.send",
        "not both",
    );
    assert_problem(
        &app(one, "[apps.health_check]\nsend_hex = \"7g\"\n"),
        "app 'a' (apps[0])",
        "health_check.send_hex",
        "is not hex bytes",
    );
    assert_problem(
        &app(
            one,
            "[apps.health_check]\nsend = \"x\"\ninterval = \"1s\"\ntimeout = \"2s\"\n",
        ),
        "app 'a' (apps[0])",
        "health_check.timeout",
        "longer than the interval",
    );
    assert_problem(
        &app(
            one,
            "[apps.health_check]\nsend = \"x\"\ninterval = \"10ms\"\n",
        ),
        "app 'a' (apps[0])",
        "health_check.interval",
        "too short",
    );
    assert_problem(
        &app(one, "[apps.health_check]\nsend = \"x\"\nfall = 0\n"),
        "app 'a' (apps[0])",
        "health_check.fall",
        "0 is out of range",
    );
    let tcp = with_agent(
        "[[apps]]\nid = \"t\"\nprotocol = \"tcp/22\"\norigin_direct = [\"tcp://10.0.0.2:22\"]\n\
         [apps.health_check]\nsend = \"x\"\n",
    );
    assert_problem(
        &tcp,
        "app 't' (apps[0])",
        "health_check.send",
        "a TCP app's health check is a connect",
    );
    assert_problem(
        &app(one, "[apps.health_check]\nsend = \"x\"\nport = 1\n"),
        "app 'a' (apps[0])",
        "",
        "unknown field `port`",
    );
}

// ---- TLS termination (tls, tls_*) ----

const TLS_WEB: &str = "app 'web' (apps[0])";

/// A TCP app `web` with `body` added.
fn tls_app(body: &str) -> String {
    with_agent(&format!(
        "[[apps]]\nid = \"web\"\nprotocol = \"tcp/443\"\norigin_direct = [\"tcp://10.0.0.5:443\"]\n{body}"
    ))
}

const CERTS: &str = "tls_certificates = [{ cert = \"/etc/f/a.pem\", key = \"/etc/f/a.key\" }, { cert = \"b.pem\", key = \"b.key\" }]\n";

#[test]
fn tls_keys_parse_into_the_model_and_round_trip() {
    let config = parse_ok(&tls_app(&format!(
        "tls = \"strict\"\n{CERTS}tls_strict_sni = true\nmin_tls_version = \"1.3\"\n\
         tls_origin_ca = \"/etc/f/ca.pem\"\ntls_origin_server_name = \"origin.example\"\n"
    )));
    let tls = &config.apps[0].tls;
    assert_eq!(tls.mode, TlsMode::Strict);
    assert_eq!(
        tls.certificates,
        [
            CertificateFiles {
                cert: "/etc/f/a.pem".into(),
                key: "/etc/f/a.key".into()
            },
            CertificateFiles {
                cert: "b.pem".into(),
                key: "b.key".into()
            }
        ]
    );
    assert!(tls.strict_sni);
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert_eq!(
        tls.origin_ca.as_deref(),
        Some(std::path::Path::new("/etc/f/ca.pem"))
    );
    assert_eq!(tls.origin_server_name.as_deref(), Some("origin.example"));
    assert_eq!(parse_ok(&config.to_toml()), config);
    // Defaults: off; with a mode, TLS 1.2 up, no strict SNI, the system CA store.
    assert_eq!(parse_ok(&tls_app("")).apps[0].tls, AppTls::default());
    let flexible = parse_ok(&tls_app(&format!("tls = \"flexible\"\n{CERTS}")));
    let tls = &flexible.apps[0].tls;
    assert_eq!(
        (tls.min_version, tls.strict_sni),
        (TlsVersion::Tls12, false)
    );
    assert_eq!(tls.origin_ca, None);
    assert_eq!(parse_ok(&flexible.to_toml()), flexible);
}

#[test]
fn tls_is_one_of_the_four_modes_and_tcp_only() {
    assert_problem(
        &tls_app("tls = \"on\"\n"),
        TLS_WEB,
        "tls",
        "'on' is not one of off, flexible, full, strict",
    );
    let udp = |body: &str| {
        with_agent(&format!(
            "[[apps]]\nid = \"dns\"\nprotocol = \"udp/53\"\norigin_direct = [\"udp://10.0.0.5:53\"]\n{body}"
        ))
    };
    assert_problem(
        &udp(&format!("tls = \"flexible\"\n{CERTS}")),
        "app 'dns' (apps[0])",
        "tls",
        "TCP apps only",
    );
    assert_problem(
        &udp(&format!("tls = \"flexible\"\n{CERTS}")),
        "app 'dns' (apps[0])",
        "tls_certificates",
        "TCP apps only",
    );
    // "off" on UDP says what is true anyway.
    parse_ok(&udp("tls = \"off\"\n"));
}

#[test]
fn tls_certificates_are_required_with_a_mode_and_only_then() {
    for mode in ["flexible", "full", "strict"] {
        assert_problem(
            &tls_app(&format!("tls = \"{mode}\"\n")),
            TLS_WEB,
            "tls_certificates",
            "missing",
        );
        assert_problem(
            &tls_app(&format!("tls = \"{mode}\"\ntls_certificates = []\n")),
            TLS_WEB,
            "tls_certificates",
            "missing",
        );
    }
    assert_problem(
        &tls_app("tls = \"flexible\"\ntls_certificates = [{ cert = \"a.pem\" }]\n"),
        TLS_WEB,
        "tls_certificates[0].key",
        "missing",
    );
    assert_problem(
        &tls_app(
            "tls = \"flexible\"\ntls_certificates = [{ cert = \"a.pem\", key = \"a.key\", chain = \"x\" }]\n",
        ),
        TLS_WEB,
        "tls_certificates",
        "unknown field `chain`",
    );
    for key in [
        CERTS.to_string(),
        "tls_strict_sni = true\n".into(),
        "min_tls_version = \"1.3\"\n".into(),
    ] {
        let text = tls_app(&key);
        let field = key.split(' ').next().unwrap();
        assert_problem(&text, TLS_WEB, field, "only with tls = ");
    }
}

#[test]
fn min_tls_version_and_the_origin_keys_are_checked() {
    assert_problem(
        &tls_app(&format!(
            "tls = \"full\"\n{CERTS}min_tls_version = \"1.1\"\n"
        )),
        TLS_WEB,
        "min_tls_version",
        "'1.1' is not one of 1.2, 1.3",
    );
    assert_problem(
        &tls_app(&format!(
            "tls = \"full\"\n{CERTS}tls_origin_ca = \"/ca.pem\"\n"
        )),
        TLS_WEB,
        "tls_origin_ca",
        "only with tls = \"strict\"",
    );
    assert_problem(
        &tls_app(&format!(
            "tls = \"flexible\"\n{CERTS}tls_origin_server_name = \"o.example\"\n"
        )),
        TLS_WEB,
        "tls_origin_server_name",
        "only with tls = \"full\" or \"strict\"",
    );
    assert_problem(
        &tls_app(&format!(
            "tls = \"strict\"\n{CERTS}tls_origin_server_name = \"not a name\"\n"
        )),
        TLS_WEB,
        "tls_origin_server_name",
        "neither a DNS name nor an IP address",
    );
    let ip = parse_ok(&tls_app(&format!(
        "tls = \"full\"\n{CERTS}tls_origin_server_name = \"10.0.0.5\"\n"
    )));
    assert_eq!(
        ip.apps[0].tls.origin_server_name.as_deref(),
        Some("10.0.0.5")
    );
}

/// `Config::load` (check-config and run) reads the files the TLS keys name.
#[test]
fn load_reads_every_certificate_key_and_ca_file() {
    use crate::tls::test_pki::TestPki;
    let pki = TestPki::new("config");
    let ca = pki.ca("ca");
    let good = pki.leaf("good", &["web.example"], Some(&ca));
    let other = pki.leaf("other", &["other.example"], Some(&ca));
    let write = |body: &str| {
        let path = pki.dir().join("forwarder.toml");
        std::fs::write(&path, tls_app(body)).unwrap();
        path
    };
    let entry = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "tls_certificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            cert.display(),
            key.display()
        )
    };
    let problems = |body: &str| -> Vec<Problem> {
        match Config::load(&write(body)) {
            Ok(_) => panic!("expected problems for:\n{body}"),
            Err(e) => e.problems,
        }
    };
    let has = |problems: &[Problem], field: &str, part: &str| {
        assert!(
            problems
                .iter()
                .any(|p| p.location == TLS_WEB && p.field == field && p.reason.contains(part)),
            "no {field}: ...{part}... in {problems:?}"
        );
    };
    // Good: relative paths are the config file's directory's.
    let config = Config::load(&write(
        "tls = \"strict\"\ntls_certificates = [{ cert = \"good.pem\", key = \"good.key\" }]\n\
         tls_origin_ca = \"ca.pem\"\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.apps[0].tls.certificates[0].cert, good.cert);
    assert_eq!(config.apps[0].tls.origin_ca.as_ref(), Some(&ca.cert));

    let missing = pki.dir().join("missing.pem");
    has(
        &problems(&format!(
            "tls = \"flexible\"\n{}",
            entry(&missing, &good.key)
        )),
        "tls_certificates[0].cert",
        "cannot read",
    );
    has(
        &problems(&format!(
            "tls = \"flexible\"\n{}",
            entry(&good.cert, &missing)
        )),
        "tls_certificates[0].key",
        "cannot read",
    );
    has(
        &problems(&format!(
            "tls = \"full\"\n{}",
            entry(&good.cert, &other.key)
        )),
        "tls_certificates[0].key",
        "is not the key of the certificate",
    );
    has(
        &problems(&format!(
            "tls = \"flexible\"\n{}",
            entry(&good.key, &good.key)
        )),
        "tls_certificates[0].cert",
        "no PEM CERTIFICATE",
    );
    has(
        &problems(&format!(
            "tls = \"strict\"\n{}tls_origin_ca = \"{}\"\n",
            entry(&good.cert, &good.key),
            missing.display()
        )),
        "tls_origin_ca",
        "cannot read",
    );
}

#[test]
fn tcp_fastpath_xdp_cannot_carry_an_app_whose_tls_the_edge_terminates() {
    let text = with_agent(
        "[[apps]]\nid = \"web\"\nprotocol = \"tcp/443\"\norigin_direct = [\"tcp://10.0.0.5:443\"]\n\
         tcp_fastpath = \"xdp\"\ntls = \"flexible\"\ntls_certificates = [{ cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }]\n",
    );
    assert_problem(
        &text,
        "app 'web' (apps[0])",
        "tcp_fastpath",
        "cannot carry an app whose TLS",
    );
}
