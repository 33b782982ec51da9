//! The benchmark harness must not rot: `bench --quick` runs every scenario for one
//! short round and produces the table, `results.json` and `results.svg` with a row
//! for every scenario and variant. Only the shape of the output is checked, never a
//! timing (root only; see `require_root`).

use std::path::PathBuf;
use std::process::Command;

use forwarder_tests::require_root;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bench"))
}

#[test]
fn quick_bench_produces_every_row() {
    if !require_root() {
        return;
    }
    let list = bench().arg("--list").output().expect("bench --list");
    assert!(list.status.success(), "bench --list failed");
    let scenarios: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for expected in [
        "xdp-cost",
        "udp-flood",
        "udp-forward",
        "tcp-throughput",
        "tcp-connrate",
        "syn-flood",
        "tls",
    ] {
        assert!(
            scenarios.iter().any(|s| s == expected),
            "scenario {expected} missing from --list: {scenarios:?}"
        );
    }

    let out_dir: PathBuf =
        std::env::temp_dir().join(format!("fwd-bench-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let run = bench()
        .args(["--quick", "--out"])
        .arg(&out_dir)
        .output()
        .expect("run bench --quick");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success(),
        "bench --quick failed ({}):\n{stdout}\n{stderr}",
        run.status
    );

    let json = std::fs::read_to_string(out_dir.join("results.json")).expect("results.json");
    let svg = std::fs::read_to_string(out_dir.join("results.svg")).expect("results.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(json.trim_start().starts_with('{') && json.trim_end().ends_with('}'));
    for scenario in &scenarios {
        assert!(
            stdout.lines().any(|l| l.starts_with(scenario.as_str())),
            "no table row for {scenario}:\n{stdout}"
        );
        assert!(
            json.contains(&format!("\"name\": \"{scenario}\"")),
            "{scenario} missing from results.json"
        );
        assert!(
            svg.contains(scenario.as_str()),
            "{scenario} missing from the chart"
        );
    }
    // Variants of the first scenarios, and the targets section.
    for variant in [
        "xdp_pass",
        "no-app-drop",
        "spp-rewrite",
        "xdp-drop",
        "nft-drop",
        "kernel",
        "xdp-spp",
        "nginx",
        "haproxy",
        "uring-floor",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(variant)),
            "no table row for variant {variant}:\n{stdout}"
        );
    }
    assert!(stdout.contains("targets:"), "no targets section:\n{stdout}");
    // The harness measured something: the baseline of xdp-cost has a number.
    let baseline = stdout
        .lines()
        .find(|l| l.starts_with("xdp-cost") && l.split_whitespace().nth(1) == Some("xdp_pass"))
        .expect("xdp_pass row");
    assert!(
        baseline.contains("baseline") && !baseline.contains("unavailable"),
        "xdp-cost baseline not measured: {baseline}\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
