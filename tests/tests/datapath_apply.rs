//! Applying a plan is all or nothing (issue 12): a fault injected at every single
//! map write of a reload leaves the maps holding exactly the previous plan, and the
//! same reload then succeeds. Its own test binary: the fault is process-wide.
//!
//! Run: `cargo test -p forwarder-tests --test datapath_apply` (root).

use std::net::IpAddr;

use forwarder::config::Config;
use forwarder::datapath::{Datapath, Plan, faults};
use forwarder::route::route_to;
use forwarder_tests::{EDGE_ADDRESSES, Lab, ORIGIN_V4, ORIGIN_V6, require_root};

fn config(ec: &str, eo: &str, version: u8) -> String {
    let common = format!(
        "[agent]\ninterfaces = [\"{ec}\", \"{eo}\"]\npass = [\"tcp/22\"]\nudp_nat_ports = \"40000-40099\"\n"
    );
    let a = r#"
[[access_rules]]
mode = "block"
target = "ip_range"
value = "198.51.100.0/24"

[[apps]]
id = "spp"
protocol = "udp/5000"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:5000"]
proxy_protocol = "simple"

[[apps]]
id = "web"
protocol = "tcp/8080"
origin_direct = ["tcp://10.0.2.2:8080"]
"#;
    let b = r#"
[[access_rules]]
mode = "allow"
target = "ip"
value = "198.51.100.7"

[[access_rules]]
mode = "block"
target = "ip_range"
value = "2001:db8::/32"

[[apps]]
id = "web"
protocol = "tcp/8080-8090"
origin_direct = ["tcp://10.0.2.2:9080-9090"]

[[apps]]
id = "nat6"
protocol = "udp/5001"
edge_ips = ["fd00:1::1"]
origin_direct = ["udp://[fd00:2::2]:5001"]

[[apps]]
id = "game"
protocol = "udp/7000-7009"
edge_ips = ["10.0.1.1"]
origin_direct = ["udp://10.0.2.2:7100-7109"]
proxy_protocol = "v2"
"#;
    format!("{common}{}", if version == 0 { a } else { b })
}

#[test]
fn a_reload_failing_at_any_map_write_leaves_the_previous_maps() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().expect("lab");
    for addr in [IpAddr::from(ORIGIN_V4), ORIGIN_V6.into()] {
        lab.edge().ping(addr).expect("edge reaches the origin");
    }
    let [ec, eo] = lab.edge_ifaces();
    let (ec, eo) = (ec.to_owned(), eo.to_owned());
    lab.edge()
        .run_in(move || {
            let edges = EDGE_ADDRESSES;
            let parse = |v| Config::parse(&config(&ec, &eo, v)).expect("valid config");
            let mut datapath = Datapath::load().expect("load");
            let a = Plan::build(&parse(0), &edges, route_to).expect("plan A");
            datapath.apply(&a).expect("apply A");
            datapath.maps_hold(&a).expect("the maps hold A");
            let b = Plan::rebuild(Some(&a), &parse(1), &edges, route_to, &Default::default())
                .expect("plan B");
            let mut faults_seen = 0;
            for n in 0..2000 {
                faults::fail_write(n);
                let result = datapath.apply(&b);
                faults::clear();
                match result {
                    Ok(()) => break,
                    Err(err) => {
                        faults_seen += 1;
                        let text = format!("{err:#}");
                        assert!(
                            text.contains("injected fault") && text.contains("rolled back"),
                            "write {n}: {text}"
                        );
                        if let Err(diff) = datapath.maps_hold(&a) {
                            panic!("after a fault at write {n} the maps are not A: {diff:#}");
                        }
                        assert_eq!(datapath.plan(), Some(&a), "the current plan is A");
                    }
                }
            }
            assert!(
                faults_seen > 20,
                "the reload has many writes, each was failed once ({faults_seen})"
            );
            datapath
                .maps_hold(&b)
                .expect("the same reload then succeeds: the maps hold B");
            // And back, failing half way once more.
            let a2 = Plan::rebuild(Some(&b), &parse(0), &edges, route_to, &Default::default())
                .expect("plan A again");
            faults::fail_write(faults_seen / 2);
            assert!(datapath.apply(&a2).is_err());
            faults::clear();
            datapath
                .maps_hold(&b)
                .expect("still B after the failed reload");
            datapath.apply(&a2).expect("the reload back succeeds");
            datapath.maps_hold(&a2).expect("the maps hold A again");
        })
        .expect("edge thread");
    lab.close().expect("lab teardown");
}
