//! Everything the agent does to the host outside its own process: route netlink
//! (routes, neighbours, addresses, links, change events), sysctls, the open-file
//! limit, and the record of what it changed so that it can be put back.
//!
//! * [`netlink`]: the route netlink client;
//! * [`route`]: routes and managed neighbours towards origins, the route epoch;
//! * [`fd_limit`]: the open-file limit;
//! * [`state`]: [`HostState`], the single-instance lock and the journal of host
//!   changes (sysctls with their original values, neighbour entries, the control
//!   socket) in the state directory, restored on every exit path and repaired by
//!   the next start after a crash;
//! * `sysctl` and `neighbour`: the changes themselves, each journaled before it is
//!   made (methods of [`HostState`]).

pub mod fd_limit;
mod neighbour;
pub mod netlink;
pub mod route;
pub mod state;
mod sysctl;

pub use neighbour::{NeighbourEntry, neighbour_entry};
pub use state::{DEFAULT_STATE_DIR, HostState, JOURNAL_FILE, LOCK_FILE};
pub use sysctl::{SOMAXCONN, SYNCOOKIES, forwarding_sysctl};
