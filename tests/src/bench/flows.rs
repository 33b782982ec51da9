//! Bringing the benchmarks' UDP flows to their steady state. A flow the origin
//! has answered and whose client spoke again is *assured* (docs/udp.md, Flow
//! admission) and costs one flow lookup per datagram; a flow nobody answered
//! stays *new* and costs two. The benchmarks' origins are sinks, so without this
//! their flows would be measured as one-way flows forever.

use anyhow::{Context as _, Result, bail};
use forwarder::datapath::test_run::{TestRunOptions, test_run_xdp};
use forwarder::datapath::{Datapath, PROG_XDP};
use forwarder::udp_flows::ip_from16;
use forwarder_common::{ADMISSION_NEW, FLOW_SPP, SPP_MAGIC};
use forwarder_tests::frames::udp4_frame;

const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Sends one reply from its origin (run through the datapath program with
/// `origin_ifindex` as ingress, from `origin_mac`) for every flow that has none
/// yet, so that the client's next datagram promotes it. IPv4 flows; must run in
/// the edge's namespace. Returns how many flows were answered.
pub fn answer_new_flows(
    datapath: &Datapath,
    origin_ifindex: u32,
    origin_mac: [u8; 6],
) -> Result<usize> {
    let plan = datapath.plan().context("no plan in the datapath")?;
    let fd = datapath.xdp_program_fd(PROG_XDP)?;
    let mut answered = 0;
    for (key, state) in datapath.udp_flows()? {
        if state.admission != ADMISSION_NEW {
            continue;
        }
        let origin = plan
            .origins
            .get(state.origin as usize)
            .context("the flow's origin is not in the plan")?;
        let (std::net::IpAddr::V4(from), std::net::IpAddr::V4(to)) =
            (ip_from16(origin.addr), ip_from16(origin.local))
        else {
            bail!("IPv4 flows only");
        };
        let mut payload = Vec::new();
        if state.flags & FLOW_SPP != 0 {
            payload.extend_from_slice(&SPP_MAGIC.to_be_bytes());
            payload.extend_from_slice(&key.client);
            payload.extend_from_slice(&key.edge);
            payload.extend_from_slice(&key.client_port.to_be_bytes());
            payload.extend_from_slice(&key.edge_port.to_be_bytes());
        }
        payload.extend_from_slice(b"reply");
        let mut frame = udp4_frame(from, state.origin_port, to, state.local_port, &payload);
        frame[6..12].copy_from_slice(&origin_mac);
        let out = test_run_xdp(
            fd,
            &frame,
            &TestRunOptions {
                ingress_ifindex: origin_ifindex,
                ..Default::default()
            },
        )?;
        if out.verdict != XDP_REDIRECT && out.verdict != XDP_TX {
            let drops = datapath.counters()?;
            let counted: Vec<String> = forwarder_common::DropReason::ALL
                .iter()
                .filter(|r| drops.drop_count(**r) > 0)
                .map(|r| format!("{}={}", r.label(), drops.drop_count(*r)))
                .collect();
            bail!(
                "the reply to the flow from port {} was not forwarded (verdict {}; drops {})",
                key.client_port,
                out.verdict,
                counted.join(" ")
            );
        }
        answered += 1;
    }
    Ok(answered)
}
