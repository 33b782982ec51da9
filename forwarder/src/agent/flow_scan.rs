//! The UDP flow scanner: its own thread, once per `SCAN_INTERVAL`. It asks the
//! agent thread for the tables (a few milliseconds of batched reads even when they
//! are full), decides on its own (`UdpFlowTracker::scan`: announcing, ending,
//! accounting), writes the events, and sends the removals back in chunks, so a
//! `stats` request waits behind one chunk at most, never behind a whole scan.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use log::error;

use super::{AgentHandle, Command};
use crate::udp_flows::{SCAN_INTERVAL, UdpFlowTracker, monotonic_ns};

/// Removals per command (each is a system call or two).
const REMOVALS_PER_COMMAND: usize = 1024;

/// Scans until `stop` is set or the agent has stopped.
pub fn run(agent: &AgentHandle, stop: &AtomicBool) {
    let mut tracker = UdpFlowTracker::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        next += SCAN_INTERVAL;
        // Sleep in short steps so a shutdown is not kept waiting.
        while Instant::now() < next {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50).min(next - Instant::now()));
        }
        let started = Instant::now();
        let (tables, events) = match agent.read_flow_tables() {
            Ok(read) => read,
            Err(err) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                error!("UDP flow scan failed: {err:#}");
                continue;
            }
        };
        let outcome = tracker.scan(&tables, monotonic_ns(), SystemTime::now());
        for event in &outcome.events {
            events.emit(event);
        }
        for chunk in outcome.ended.chunks(REMOVALS_PER_COMMAND) {
            if !agent.tell(Command::EndUdpFlows(chunk.to_vec())) {
                return;
            }
        }
        let mut stats = tracker.stats(&tables);
        stats.scan_seconds = started.elapsed().as_secs_f64();
        if !agent.tell(Command::SetUdpFlowStats(stats)) {
            return;
        }
    }
}
