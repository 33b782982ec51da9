//! Subcommands that are clients of a running agent (the agent itself is
//! `agent::run`; `check-config` lives with the config it judges).

pub mod origins;
pub mod stats;
