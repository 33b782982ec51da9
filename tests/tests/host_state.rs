//! The host as the agent found it (issue 12, finding 4): `forwarder run` in the
//! lab's `edge` namespace changes per-namespace sysctls (forwarding per interface
//! and family, `somaxconn`, `tcp_syncookies`) and neighbour entries, journals each
//! change in its state directory first, and puts everything back on every exit
//! path: a `SIGKILL` is repaired by the next start (to the values from before the
//! *first* start), a start that fails half way leaves the host as found, what a
//! reload adds is journaled and put back too, a second agent with the same state
//! directory refuses before touching anything and leaves the first serving, and a
//! neighbour entry that existed before the agent survives its exit. Every test sets the sysctls to values the agent would change first, so
//! that a change left behind shows.
//!
//! Run as root after `cargo build -p forwarder`:
//! `cargo test -p forwarder-tests --test host_state` (or `cargo xtask test`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forwarder_tests::agent::{AgentOptions, AgentProcess};
use forwarder_tests::{Lab, ORIGIN_V4, ORIGIN_V6, require_root};

/// Bound for an agent that must refuse to start to exit.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// `somaxconn` as the tests leave it before the agent starts (below the agent's
/// backlog, so a TCP app makes it raise it).
const FOUND_SOMAXCONN: &str = "1024";
/// An origin address with no neighbour entry before the agent (on `eo`'s subnet).
const NEW_ORIGIN_V4: &str = "10.0.2.3";

/// A state directory shared by the agents of one test, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(lab: &Lab) -> StateDir {
        let dir = std::env::temp_dir().join(format!(
            "forwarder-host-state-{}-{}",
            std::process::id(),
            lab.id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the shared directory");
        StateDir(dir)
    }

    /// Both agents of a test use the same state directory and control socket.
    fn options(&self) -> AgentOptions {
        AgentOptions {
            state_dir: Some(self.0.join("state")),
            control: Some(self.0.join("control.sock")),
            ..AgentOptions::default()
        }
    }

    fn journal(&self) -> PathBuf {
        self.0.join("state").join(forwarder::host::JOURNAL_FILE)
    }

    fn control(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[agent]` on `interfaces` with `extra` lines, then `apps`.
fn config(interfaces: &[&str], extra: &str, apps: &str) -> String {
    let list: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "[agent]\ninterfaces = [{}]\n{extra}\n{apps}",
        list.join(", ")
    )
}

const UDP_V4: &str =
    "[[apps]]\nprotocol = \"udp/5000\"\norigin_direct = [\"udp://10.0.2.2:5000\"]\n";
const UDP_V6: &str =
    "[[apps]]\nprotocol = \"udp/5002\"\norigin_direct = [\"udp://[fd00:2::2]:5002\"]\n";
const UDP_NEW_V4: &str =
    "[[apps]]\nprotocol = \"udp/5003\"\norigin_direct = [\"udp://10.0.2.3:5003\"]\n";
const TCP: &str = "[[apps]]\nprotocol = \"tcp/6000\"\norigin_direct = [\"tcp://10.0.2.2:6000\"]\n";

/// The sysctls the agent may change in `edge` for `interfaces`, by dotted name.
fn sysctls(lab: &Lab, interfaces: &[&str]) -> BTreeMap<String, String> {
    let mut keys = vec![
        "net.core.somaxconn".to_string(),
        "net.ipv4.tcp_syncookies".to_string(),
    ];
    for interface in interfaces {
        for family in ["ipv4", "ipv6"] {
            keys.push(format!("net.{family}.conf.{interface}.forwarding"));
        }
    }
    keys.into_iter()
        .map(|key| {
            let value = lab.edge().read_sysctl(&key).expect("reading a sysctl");
            (key, value)
        })
        .collect()
}

/// Sets what the agent would change to values it changes: forwarding off on
/// `interfaces` (both families), `somaxconn` low, SYN cookies off. Returns the
/// sysctls as found.
fn prepare_sysctls(lab: &Lab, interfaces: &[&str]) -> BTreeMap<String, String> {
    for interface in interfaces {
        for family in ["ipv4", "ipv6"] {
            lab.edge()
                .sysctl(&format!("net.{family}.conf.{interface}.forwarding"), "0")
                .expect("forwarding off");
        }
    }
    lab.edge()
        .sysctl("net.core.somaxconn", FOUND_SOMAXCONN)
        .expect("somaxconn");
    lab.edge()
        .sysctl("net.ipv4.tcp_syncookies", "0")
        .expect("syncookies off");
    sysctls(lab, interfaces)
}

/// `ip neigh show to ADDR dev DEV nud all` in `edge` (empty: no entry), e.g.
/// `10.0.2.2 lladdr 02:… managed REACHABLE`.
fn neighbour(lab: &Lab, addr: &str, dev: &str) -> String {
    lab.edge()
        .ip(&["neigh", "show", "to", addr, "dev", dev, "nud", "all"])
        .expect("ip neigh show")
        .trim()
        .to_string()
}

/// Removes the learned neighbour entries of `eo` (the lab's own pings may have
/// left some), so that every entry after a start is the agent's.
fn flush_neighbours(lab: &Lab) {
    let eo = lab.edge_ifaces()[1];
    lab.edge()
        .ip(&["neigh", "flush", "dev", eo, "nud", "all"])
        .expect("ip neigh flush");
    for addr in [
        ORIGIN_V4.to_string(),
        ORIGIN_V6.to_string(),
        NEW_ORIGIN_V4.to_string(),
    ] {
        assert_eq!(neighbour(lab, &addr, eo), "", "no entry for {addr} yet");
    }
}

/// The journal's records of sysctls, path → original value.
fn journaled_originals(journal: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(journal)
        .unwrap_or_else(|e| panic!("reading {}: {e}", journal.display()));
    let value: serde_json::Value = serde_json::from_str(&text).expect("the journal is JSON");
    value["sysctls"]
        .as_array()
        .expect("a list of sysctls")
        .iter()
        .map(|r| {
            let path = r["path"].as_str().expect("path").to_string();
            let original = r["original"].as_str().expect("original").to_string();
            (path, original)
        })
        .collect()
}

#[track_caller]
fn assert_changed(lab: &Lab, interfaces: &[&str], v6: bool) {
    let now = sysctls(lab, interfaces);
    for interface in interfaces {
        assert_eq!(now[&format!("net.ipv4.conf.{interface}.forwarding")], "1");
        if v6 {
            assert_eq!(now[&format!("net.ipv6.conf.{interface}.forwarding")], "1");
        }
    }
    assert_eq!(now["net.core.somaxconn"], "65535");
    assert_eq!(now["net.ipv4.tcp_syncookies"], "1");
    let eo = lab.edge_ifaces()[1];
    for addr in [ORIGIN_V4.to_string(), ORIGIN_V6.to_string()] {
        let entry = neighbour(lab, &addr, eo);
        assert!(
            entry.contains("managed"),
            "{addr}: managed entry, got {entry:?}"
        );
    }
}

#[test]
fn a_sigkill_is_repaired_by_the_next_start_to_the_original_values() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let [ec, eo] = lab.edge_ifaces();
    let found = prepare_sysctls(&lab, &[ec, eo]);
    flush_neighbours(&lab);
    let shared = StateDir::new(&lab);
    let toml = config(&[ec, eo], "", &format!("{UDP_V4}{UDP_V6}{TCP}"));

    let mut first = AgentProcess::start_with(&lab, &toml, &shared.options()).unwrap();
    assert_changed(&lab, &[ec, eo], true);
    let status = first.kill().unwrap();
    assert_eq!(status.code(), None, "killed by a signal: {status}");

    // Nothing was put back: that is what the journal is for.
    assert_changed(&lab, &[ec, eo], true);
    assert!(
        shared.journal().exists(),
        "the journal stays after a SIGKILL"
    );
    assert!(
        shared.control().exists(),
        "the dead agent's control socket stays"
    );
    let originals = journaled_originals(&shared.journal());
    let v4_forwarding = format!("/proc/sys/net/ipv4/conf/{eo}/forwarding");
    assert_eq!(originals[&v4_forwarding], "0", "{originals:?}");

    let mut second = AgentProcess::start_with(&lab, &toml, &shared.options()).unwrap();
    let log = second.stderr();
    assert!(
        log.contains(&format!(
            "repairing what the previous agent (pid {}) left on the host",
            first.pid()
        )) && log.contains("repair: restored net.core.somaxconn=1024")
            && log.contains(&format!("repair: restored net.ipv4.conf.{eo}.forwarding=0"))
            && log.contains(&format!(
                "repair: removed the neighbour entry for {ORIGIN_V4} on {eo}"
            ))
            && log.contains("repair: removed the stale control socket")
            && log.contains("repair complete"),
        "each repair logged\n{}",
        second.logs()
    );
    // The second agent changed the same things again, and journaled the values
    // from before the first start, not the first agent's.
    assert_changed(&lab, &[ec, eo], true);
    let originals = journaled_originals(&shared.journal());
    assert_eq!(originals[&v4_forwarding], "0", "{originals:?}");
    assert_eq!(
        originals["/proc/sys/net/core/somaxconn"], FOUND_SOMAXCONN,
        "{originals:?}"
    );
    assert_eq!(originals["/proc/sys/net/ipv4/tcp_syncookies"], "0");
    second.stats().expect("the second agent serves");

    let status = second.stop().unwrap();
    assert!(status.success(), "{status}\n{}", second.logs());
    assert_eq!(
        sysctls(&lab, &[ec, eo]),
        found,
        "every sysctl as before the first start"
    );
    for addr in [ORIGIN_V4.to_string(), ORIGIN_V6.to_string()] {
        assert_eq!(
            neighbour(&lab, &addr, eo),
            "",
            "{addr}: the agents' entry is gone"
        );
    }
    assert!(!shared.journal().exists(), "no journal after a clean stop");
    assert!(
        !shared.control().exists(),
        "no control socket after a clean stop"
    );
}

#[test]
fn a_start_failing_half_way_leaves_the_host_as_found() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let [ec, eo] = lab.edge_ifaces();
    let found = prepare_sysctls(&lab, &[ec, eo, "lo"]);
    flush_neighbours(&lab);
    // Valid and matching the host, so the agent gets as far as attaching XDP:
    // `ec` takes the program, loopback has no native XDP, so the second attach
    // fails after every host change was made.
    let mut agent = AgentProcess::spawn(
        &lab,
        &config(
            &[ec, "lo"],
            "xdp_mode = \"driver\"",
            &format!("{UDP_V4}{UDP_V6}{TCP}"),
        ),
    )
    .unwrap();
    let status = agent.wait_exit(REFUSE_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(1), "{status}\n{}", agent.logs());
    let log = agent.stderr();
    assert!(
        log.contains("attaching XDP to lo in driver mode"),
        "{}",
        agent.logs()
    );
    // The changes were made, then put back.
    assert!(
        log.contains("net.core.somaxconn: 1024 -> 65535")
            && log.contains("exit: restored net.core.somaxconn=1024")
            && log.contains(&format!("exit: restored net.ipv6.conf.{ec}.forwarding=0"))
            && log.contains("exit: restored net.ipv4.tcp_syncookies=0"),
        "{}",
        agent.logs()
    );
    assert_eq!(
        sysctls(&lab, &[ec, eo, "lo"]),
        found,
        "every sysctl as found"
    );
    for addr in [ORIGIN_V4.to_string(), ORIGIN_V6.to_string()] {
        assert_eq!(neighbour(&lab, &addr, eo), "", "{addr}: no entry left");
    }
    assert!(!agent.journal_path().exists(), "no journal left");
    assert!(!agent.control_path().exists(), "no control socket left");
}

#[test]
fn a_second_agent_refuses_and_leaves_the_first_serving() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let [ec, eo] = lab.edge_ifaces();
    let found = prepare_sysctls(&lab, &[ec, eo]);
    flush_neighbours(&lab);
    let shared = StateDir::new(&lab);
    let mut first =
        AgentProcess::start_with(&lab, &config(&[ec, eo], "", UDP_V4), &shared.options()).unwrap();
    let journal = std::fs::read(shared.journal()).expect("the first agent's journal");
    let first_neighbour = neighbour(&lab, &ORIGIN_V4.to_string(), eo);
    assert!(first_neighbour.contains("managed"), "{first_neighbour}");

    // Everything in this config would change something the first left alone: IPv6
    // forwarding, somaxconn and SYN cookies, a new neighbour entry.
    let mut second = AgentProcess::spawn_with(
        &lab,
        &config(&[ec, eo], "", &format!("{UDP_V6}{UDP_NEW_V4}{TCP}")),
        &shared.options(),
    )
    .unwrap();
    let status = second.wait_exit(REFUSE_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(1), "{status}\n{}", second.logs());
    let log = second.stderr();
    assert!(
        log.contains(&format!(
            "another forwarder agent is running (pid {})",
            first.pid()
        )),
        "the refusal names the running agent\n{}",
        second.logs()
    );

    // The first agent is untouched and still serving on the shared socket.
    assert!(first.is_running());
    assert!(shared.control().exists(), "the live control socket stays");
    first.stats().expect("the first agent still answers");
    assert_eq!(
        std::fs::read(shared.journal()).expect("journal"),
        journal,
        "the first agent's journal is unchanged"
    );
    let now = sysctls(&lab, &[ec, eo]);
    for interface in [ec, eo] {
        let v6 = format!("net.ipv6.conf.{interface}.forwarding");
        assert_eq!(now[&v6], "0", "{v6}: the second agent changed nothing");
        let v4 = format!("net.ipv4.conf.{interface}.forwarding");
        assert_eq!(now[&v4], "1", "{v4}: the first agent's value stays");
    }
    assert_eq!(now["net.core.somaxconn"], FOUND_SOMAXCONN);
    assert_eq!(now["net.ipv4.tcp_syncookies"], "0");
    assert_eq!(
        neighbour(&lab, NEW_ORIGIN_V4, eo),
        "",
        "no entry by the second"
    );
    assert_eq!(
        neighbour(&lab, &ORIGIN_V4.to_string(), eo),
        first_neighbour,
        "the first agent's entry stays"
    );

    let status = first.stop().unwrap();
    assert!(status.success(), "{status}\n{}", first.logs());
    assert_eq!(sysctls(&lab, &[ec, eo]), found);
    assert_eq!(neighbour(&lab, &ORIGIN_V4.to_string(), eo), "");
    assert!(!shared.journal().exists());
}

/// The MAC address of the origin's interface (`ip -br link`).
fn origin_mac(lab: &Lab) -> String {
    let line = lab
        .origin()
        .ip(&["-br", "link", "show", "dev", lab.ifaces().origin.as_str()])
        .expect("ip link show");
    line.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {line:?}"))
        .to_string()
}

#[test]
fn neighbour_entries_that_existed_before_the_agent_survive_its_exit() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let eo = lab.edge_ifaces()[1];
    flush_neighbours(&lab);
    let mac = origin_mac(&lab);
    // An administrator's permanent entry for the IPv4 origin, a learned entry for
    // the IPv6 one; none for the third origin.
    lab.edge()
        .ip(&[
            "neigh",
            "replace",
            &ORIGIN_V4.to_string(),
            "lladdr",
            &mac,
            "dev",
            eo,
            "nud",
            "permanent",
        ])
        .expect("a permanent entry");
    lab.edge().ping(IpAddr::V6(ORIGIN_V6)).unwrap();
    let permanent = neighbour(&lab, &ORIGIN_V4.to_string(), eo);
    assert!(permanent.contains("PERMANENT"), "{permanent}");
    let learned = neighbour(&lab, &ORIGIN_V6.to_string(), eo);
    assert!(
        learned.contains(&mac) && !learned.contains("managed"),
        "{learned}"
    );

    let [ec, _] = lab.edge_ifaces();
    let mut agent = AgentProcess::start(
        &lab,
        &config(&[ec, eo], "", &format!("{UDP_V4}{UDP_V6}{UDP_NEW_V4}")),
    )
    .unwrap();
    assert_eq!(
        neighbour(&lab, &ORIGIN_V4.to_string(), eo),
        permanent,
        "a permanent entry is left as it is"
    );
    assert!(
        agent.stderr().contains(&format!(
            "the neighbour entry for {ORIGIN_V4} existed before the agent (permanent); left \
             as it is"
        )),
        "{}",
        agent.logs()
    );
    let managed = neighbour(&lab, &ORIGIN_V6.to_string(), eo);
    assert!(managed.contains("managed"), "{managed}");
    let created = neighbour(&lab, NEW_ORIGIN_V4, eo);
    assert!(created.contains("managed"), "{created}");

    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}\n{}", agent.logs());
    assert_eq!(
        neighbour(&lab, &ORIGIN_V4.to_string(), eo),
        permanent,
        "the permanent entry survives the agent's exit unchanged"
    );
    let back = neighbour(&lab, &ORIGIN_V6.to_string(), eo);
    assert!(
        back.contains(&mac) && !back.contains("managed"),
        "the learned entry is back as a learned one: {back:?}"
    );
    assert_eq!(
        neighbour(&lab, NEW_ORIGIN_V4, eo),
        "",
        "the entry the agent created is gone"
    );
    assert!(!agent.journal_path().exists());
}

/// Waits until the agent's log has `text` `n` times (a reload's outcome).
fn wait_log(agent: &AgentProcess, text: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while agent.stderr().matches(text).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} in the log\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn what_a_reload_adds_is_journaled_and_put_back_on_exit() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let [ec, eo] = lab.edge_ifaces();
    let found = prepare_sysctls(&lab, &[ec, eo]);
    flush_neighbours(&lab);
    let mut agent = AgentProcess::start(&lab, &config(&[ec, eo], "", UDP_V4)).unwrap();
    let now = sysctls(&lab, &[ec, eo]);
    assert_eq!(now[&format!("net.ipv4.conf.{eo}.forwarding")], "1");
    assert_eq!(now[&format!("net.ipv6.conf.{eo}.forwarding")], "0");
    assert_eq!(now["net.core.somaxconn"], FOUND_SOMAXCONN, "no TCP app yet");

    // The first IPv6 UDP app, a TCP app and a new origin arrive by reload.
    agent
        .write_config(&config(
            &[ec, eo],
            "",
            &format!("{UDP_V4}{UDP_V6}{UDP_NEW_V4}{TCP}"),
        ))
        .unwrap();
    agent.sighup();
    wait_log(&agent, "reload applied", 1);
    assert_changed(&lab, &[ec, eo], true);
    assert!(neighbour(&lab, NEW_ORIGIN_V4, eo).contains("managed"));
    let originals = journaled_originals(&agent.journal_path());
    assert_eq!(
        originals[&format!("/proc/sys/net/ipv6/conf/{eo}/forwarding")],
        "0"
    );
    assert_eq!(
        originals["/proc/sys/net/core/somaxconn"], FOUND_SOMAXCONN,
        "{originals:?}"
    );

    // A reload without the new origin: its entry goes at once.
    agent
        .write_config(&config(&[ec, eo], "", &format!("{UDP_V4}{UDP_V6}{TCP}")))
        .unwrap();
    agent.sighup();
    wait_log(&agent, "reload applied", 2);
    assert_eq!(neighbour(&lab, NEW_ORIGIN_V4, eo), "");

    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}\n{}", agent.logs());
    assert_eq!(sysctls(&lab, &[ec, eo]), found, "every sysctl as found");
    for addr in [ORIGIN_V4.to_string(), ORIGIN_V6.to_string()] {
        assert_eq!(neighbour(&lab, &addr, eo), "", "{addr}: no entry left");
    }
    assert!(!agent.journal_path().exists());
}
