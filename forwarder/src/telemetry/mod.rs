//! Everything the agent tells the outside: the snapshot model (`snapshot`), the
//! event log and its events (`events`), counts and analytics built from the events
//! and the one histogram type (`analytics`), the Prometheus endpoint (`metrics`)
//! and the control socket `forwarder stats` reads (`control`). The UDP flow
//! figures are computed in `udp_flows`, the TCP ones in `tcp::stats`; printing
//! them for people is `cli::stats`.

pub mod analytics;
pub mod control;
pub mod events;
pub mod metrics;
pub mod snapshot;
