//! `cargo xtask demo-fleet`: a fleet of three agents behind ECMP and BGP, and what
//! survives when one of them crashes (docs/fleet.md; root).
//!
//! Builds the fleet lab (client, router with BIRD, three edges each running
//! `forwarder run` with `examples/fleet/forwarder.toml`, BIRD and `ready-gate.sh`,
//! one origin host), shows the router's route and BGP sessions, then sends UDP SPP
//! flows and long TCP connections from several client addresses and `kill -9`s one
//! agent: first with the router's resilient nexthop group, then again with a plain
//! multipath route. Each run prints what the clients and origins saw; a summary
//! compares the two. Ends by itself in well under a minute and leaves nothing
//! behind, also on Ctrl-C.
//!
//! Exit status: 0 when every step worked, 1 when one failed, 130 when interrupted.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use forwarder_tests::demo_main::interrupted;
use forwarder_tests::failover::{self, Plan, Report};
use forwarder_tests::lab::fleet::{ANYCAST_V4, EDGES};
use forwarder_tests::{Fleet, RouterHashing};

/// The goal for the killed agent's black hole (docs/fleet.md).
const BLACK_HOLE_GOAL: Duration = Duration::from_secs(1);
const STEPS: usize = 4;

fn step(n: usize, title: &str) {
    println!("\n\x1b[1m[{n}/{STEPS}] {title}\x1b[0m");
}

fn say(line: impl AsRef<str>) {
    println!("      {}", line.as_ref());
}

/// The router's view: its route to the anycast address and its BGP sessions.
fn show_router(fleet: &Fleet) -> Result<()> {
    let prefix = format!("{ANYCAST_V4}/32");
    say(format!("$ ip route show {prefix}   (router)"));
    for line in fleet.router().ip(&["route", "show", &prefix])?.lines() {
        say(format!("  {line}"));
    }
    if fleet.hashing() == RouterHashing::Resilient {
        say("$ ip nexthop show   (router)");
        for line in fleet.router().ip(&["nexthop", "show"])?.lines() {
            say(format!("  {line}"));
        }
    }
    Ok(())
}

/// Builds a fleet, shows it, runs the failover; checks what must hold whatever the
/// router's hashing.
fn failover_run(hashing: RouterHashing, show: bool) -> Result<Report> {
    say(format!(
        "building the fleet: client, router (BIRD, {}), {EDGES} edges (agent + BIRD + ready-gate), origin",
        hashing.as_str()
    ));
    let mut fleet = Fleet::new(hashing)?;
    say(format!(
        "every edge announces {ANYCAST_V4}/32 over BGP since its /ready answers; the router forwards to edges {:?}",
        fleet
            .router_edges()?
            .iter()
            .map(|i| format!("edge{}", i + 1))
            .collect::<Vec<_>>()
    ));
    if show {
        show_router(&fleet)?;
    }
    interrupted()?;
    let report = failover::run(&mut fleet, &Plan::default(), &mut |line| say(line))?;
    if show {
        show_router(&fleet)?;
    }
    fleet.close()?;
    say("fleet removed");
    for line in report.summary() {
        say(format!("\x1b[36m{line}\x1b[0m"));
    }
    let black_hole = report
        .black_hole()
        .ok_or_else(|| anyhow::anyhow!("a UDP flow of the killed agent never resumed"))?;
    // Allowing for what the shared machine stalled by itself (fleet.rs does the same).
    let allowed = BLACK_HOLE_GOAL + report.stall();
    if black_hole > allowed {
        bail!(
            "black hole {black_hole:?} is over the goal of {BLACK_HOLE_GOAL:?} (+ {:?} the machine stalled)",
            report.stall()
        );
    }
    if report.udp_resumed_intact() != report.udp.len() {
        bail!(
            "{} of {} UDP flows resumed intact",
            report.udp_resumed_intact(),
            report.udp.len()
        );
    }
    Ok(report)
}

fn demo() -> Result<bool> {
    let started = Instant::now();
    println!(
        "\x1b[1mforwarder fleet demo\x1b[0m: three agents, one config, ECMP + BGP (BIRD) in front"
    );
    let mut passed = Vec::new();

    step(
        1,
        "A fleet behind a resilient nexthop group: kill -9 one agent",
    );
    let resilient = failover_run(RouterHashing::Resilient, true)?;
    let (survivors, broken) = resilient.tcp_on_survivors();
    if broken != 0 {
        bail!("{broken}/{survivors} TCP connections broke on the surviving agents");
    }
    passed.push(format!(
        "resilient nexthops: black hole {:.0?}, {}/{} UDP flows intact, {broken}/{survivors} TCP broken on survivors",
        resilient.black_hole().unwrap_or_default(),
        resilient.udp_resumed_intact(),
        resilient.udp.len()
    ));
    interrupted()?;

    step(2, "The same behind a plain multipath route");
    let plain = failover_run(RouterHashing::Multipath, false)?;
    let (plain_survivors, plain_broken) = plain.tcp_on_survivors();
    passed.push(format!(
        "plain multipath: black hole {:.0?}, {}/{} UDP flows intact, {plain_broken}/{plain_survivors} TCP broken on survivors",
        plain.black_hole().unwrap_or_default(),
        plain.udp_resumed_intact(),
        plain.udp.len()
    ));
    interrupted()?;

    step(3, "Why");
    for line in [
        "UDP SPP flows survive: the edge keeps no state the origin depends on; the next",
        "datagram creates the flow on a survivor, which picks the same origin (a hash of",
        "the client, the same on every agent) and writes the same client into the header.",
        "TCP connections terminated on the killed agent die with it.",
        "A plain multipath route cuts its hash space anew when a next hop leaves: some",
        "survivors' flows land on another edge, which answers their TCP segments with RST.",
        "A resilient group only hands the leaving edge's buckets to the others.",
    ] {
        say(line);
    }
    passed.push("explained".to_owned());

    step(4, "Summary");
    for (name, report) in [("resilient", &resilient), ("plain", &plain)] {
        let (victim, victim_broken) = report.tcp_on_victim();
        say(format!(
            "{name}: router converged in {:.0?}; TCP on the killed agent broken {victim_broken}/{victim}",
            report.router_converged
        ));
    }
    passed.push("summary shown".to_owned());

    println!("\n\x1b[1mdemo-fleet summary\x1b[0m");
    for line in &passed {
        println!("  [ok] {line}");
    }
    interrupted()?;
    println!(
        "demo-fleet: {}/{STEPS} steps passed in {:.1}s",
        passed.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(passed.len() == STEPS)
}

fn main() -> ExitCode {
    forwarder_tests::demo_main::main("demo-fleet", demo)
}
