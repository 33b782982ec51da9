//! The neighbour entries the UDP fast path needs (origins' next hops, gateways
//! towards clients), made *managed* so that the kernel keeps them resolved, and put
//! back on exit according to what was there before the agent:
//!
//! | before the agent | while it runs | on exit |
//! | --- | --- | --- |
//! | no entry | created, managed | deleted |
//! | a learned entry (reachable, stale, failed, …) | made managed | put back as a learned entry: `stale` with the MAC it has then (or had before), unmanaged; the kernel confirms it on next use. Without any MAC: deleted |
//! | `permanent` or `noarp` (set by an administrator), or managed by someone else | left as it is | left as it is |
//!
//! An entry the agent manages that someone else changed while it ran (it is no
//! longer managed) is left as it is on exit.

use std::fmt::Write as _;

use anyhow::Context as _;
use log::{debug, info};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE, Parseable as _};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};

use super::netlink::Rtnl;
use super::route::{Neighbour, keep_neighbour_resolved, neighbour_message, release_neighbour};
use super::state::{HostState, NeighbourRecord};
use crate::datapath::ifindex;

/// A neighbour cache entry as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourEntry {
    pub state: NeighbourState,
    /// `NTF_EXT_MANAGED`: the kernel keeps it resolved.
    pub managed: bool,
    /// The link-layer address, when the entry has one.
    pub lladdr: Option<Vec<u8>>,
}

impl NeighbourEntry {
    /// Set by an administrator or kept by someone else: the agent leaves it alone.
    pub fn is_administered(&self) -> bool {
        self.managed
            || matches!(
                self.state,
                NeighbourState::Permanent | NeighbourState::Noarp
            )
    }
}

/// The kernel's entry for `neighbour`, if it has one (`None` also when the
/// interface does not exist).
pub fn neighbour_entry(neighbour: &Neighbour) -> anyhow::Result<Option<NeighbourEntry>> {
    let Ok(index) = ifindex(&neighbour.dev) else {
        return Ok(None);
    };
    let mut request = NeighbourMessage::default();
    request.header.family = match neighbour.addr {
        std::net::IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
        std::net::IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
    };
    let replies = Rtnl::open()
        .and_then(|mut rtnl| rtnl.dump(RouteNetlinkMessage::GetNeighbour(request)))
        .with_context(|| format!("listing the neighbour entries of {}", neighbour.dev))?;
    let wanted: NeighbourAddress = neighbour.addr.into();
    for reply in replies {
        if reply.message_type != libc::RTM_NEWNEIGH {
            continue;
        }
        let Ok(message) = NeighbourMessage::parse(reply.payload.as_slice()) else {
            continue;
        };
        if message.header.ifindex != index
            || !message
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Destination(d) if *d == wanted))
        {
            continue;
        }
        let mut entry = NeighbourEntry {
            state: message.header.state,
            managed: false,
            lladdr: None,
        };
        for attribute in message.attributes {
            match attribute {
                NeighbourAttribute::ExtFlags(flags) => {
                    entry.managed = flags.contains(NeighbourExtFlags::Managed);
                }
                NeighbourAttribute::LinkLayerAddress(mac) if !mac.is_empty() => {
                    entry.lladdr = Some(mac);
                }
                _ => {}
            }
        }
        return Ok(Some(entry));
    }
    Ok(None)
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(bytes: &[u8]) -> String {
    let mut text = String::new();
    for (i, byte) in bytes.iter().enumerate() {
        if i > 0 {
            text.push(':');
        }
        let _ = write!(text, "{byte:02x}");
    }
    text
}

fn parse_mac(text: &str) -> Option<Vec<u8>> {
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16).ok())
        .collect();
    bytes.filter(|b| !b.is_empty())
}

/// Makes `neighbour` an ordinary learned entry again: `stale` with `mac`, the
/// managed flag cleared (what `ip neigh replace ADDR lladdr MAC dev DEV nud stale`
/// sends).
fn unmanage(neighbour: &Neighbour, mac: Vec<u8>) -> anyhow::Result<()> {
    let mut message = neighbour_message(neighbour)?;
    message.header.state = NeighbourState::Stale;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac));
    Rtnl::open()?.request(
        RouteNetlinkMessage::NewNeighbour(message),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?;
    Ok(())
}

/// Puts back the entry of a journaled neighbour (see the module docs). Returns
/// what was done, for the log.
pub(crate) fn restore_neighbour(record: &NeighbourRecord) -> anyhow::Result<String> {
    let neighbour = record.neighbour();
    let what = format!("the neighbour entry for {} on {}", record.addr, record.dev);
    let Some(entry) = neighbour_entry(&neighbour)? else {
        return Ok(format!("{what}: already gone"));
    };
    if !entry.managed {
        return Ok(format!(
            "{what} left as it is: changed by someone else since (now {}, not managed)",
            entry.state
        ));
    }
    if record.created {
        release_neighbour(&neighbour);
        return Ok(format!("removed {what} (created by the agent)"));
    }
    match entry
        .lladdr
        .or_else(|| record.lladdr.as_deref().and_then(parse_mac))
    {
        Some(mac) => {
            let text = format_mac(&mac);
            unmanage(&neighbour, mac).with_context(|| format!("putting back {what}"))?;
            Ok(format!(
                "put back {what} as a learned entry ({text}, stale, unmanaged), as it was \
                 before the agent"
            ))
        }
        None => {
            release_neighbour(&neighbour);
            Ok(format!(
                "removed {what}: it existed before the agent but never had an address"
            ))
        }
    }
}

impl HostState {
    /// Keeps the `wanted` neighbours resolved (managed entries) and puts back the
    /// entries of those the agent manages that are no longer wanted. Each entry is
    /// journaled (with whether it existed before) before it is changed; entries
    /// set by an administrator are left alone.
    pub fn manage_neighbours(&mut self, wanted: &[Neighbour]) -> anyhow::Result<()> {
        for neighbour in wanted {
            if self.journal().neighbours.iter().any(|r| r.is(neighbour)) {
                keep_neighbour_resolved(neighbour)?;
                continue;
            }
            let entry = neighbour_entry(neighbour).with_context(|| {
                format!(
                    "could not install a managed neighbour for {} on {}",
                    neighbour.addr, neighbour.dev
                )
            })?;
            if let Some(entry) = &entry
                && entry.is_administered()
            {
                if !self.left_alone.contains(neighbour) {
                    info!(
                        "{}: the neighbour entry for {} existed before the agent ({}{}); \
                         left as it is",
                        neighbour.dev,
                        neighbour.addr,
                        entry.state,
                        if entry.managed { ", managed" } else { "" }
                    );
                    self.left_alone.push(neighbour.clone());
                }
                continue;
            }
            match &entry {
                None => debug!(
                    "{}: creating a managed neighbour entry for {} (removed on exit)",
                    neighbour.dev, neighbour.addr
                ),
                Some(entry) => info!(
                    "{}: the learned neighbour entry for {} ({}) becomes managed while the \
                     agent runs; put back as a learned entry on exit",
                    neighbour.dev, neighbour.addr, entry.state
                ),
            }
            self.journal_mut().neighbours.push(NeighbourRecord {
                addr: neighbour.addr,
                dev: neighbour.dev.clone(),
                created: entry.is_none(),
                lladdr: entry.and_then(|e| e.lladdr).map(|mac| format_mac(&mac)),
            });
            self.save()?;
            keep_neighbour_resolved(neighbour)?;
        }
        self.left_alone.retain(|n| wanted.contains(n));

        let (keep, release): (Vec<_>, Vec<_>) = self
            .journal()
            .neighbours
            .iter()
            .cloned()
            .partition(|r| wanted.iter().any(|n| r.is(n)));
        if release.is_empty() {
            return Ok(());
        }
        let mut left = keep;
        for record in release {
            match restore_neighbour(&record) {
                Ok(done) => debug!("{done}"),
                Err(err) => {
                    log::warn!("{err:#}");
                    left.push(record);
                }
            }
        }
        self.journal_mut().neighbours = left;
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::netlink::test_netns::{addr, in_new_netns, ip, veth_lab};

    #[test]
    fn macs_print_and_parse() {
        let mac = [0x02, 0x00, 0x5e, 0x10, 0x00, 0xff];
        assert_eq!(format_mac(&mac), "02:00:5e:10:00:ff");
        assert_eq!(parse_mac("02:00:5e:10:00:ff"), Some(mac.to_vec()));
        assert_eq!(parse_mac("zz"), None);
        assert_eq!(parse_mac(""), None);
    }

    fn on_veth0(a: &str) -> Neighbour {
        Neighbour {
            addr: addr(a),
            dev: "veth0".to_string(),
        }
    }

    fn entry(n: &Neighbour) -> Option<NeighbourEntry> {
        neighbour_entry(n).expect("neighbour dump")
    }

    /// Only what the agent created is deleted; a learned entry is put back as a
    /// learned one; a permanent entry is never touched.
    #[test]
    fn entries_are_put_back_as_they_were() {
        let Some(()) = in_new_netns(|| {
            veth_lab();
            let dir = std::env::temp_dir().join(format!(
                "fwd-neigh-test-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let created = on_veth0("192.0.2.9");
            let learned = on_veth0("192.0.2.10");
            let permanent = on_veth0("192.0.2.11");
            let v6 = on_veth0("2001:db8::9");
            #[rustfmt::skip]
            ip(&["neigh", "replace", "192.0.2.10", "lladdr", "02:00:00:00:00:0a", "dev", "veth0", "nud", "reachable"]);
            #[rustfmt::skip]
            ip(&["neigh", "replace", "192.0.2.11", "lladdr", "02:00:00:00:00:0b", "dev", "veth0", "nud", "permanent"]);
            assert_eq!(entry(&created), None);

            let mut state = HostState::acquire(&dir, None).expect("lock");
            let all = [
                created.clone(),
                learned.clone(),
                permanent.clone(),
                v6.clone(),
            ];
            state.manage_neighbours(&all).expect("managed");
            for n in [&created, &learned, &v6] {
                assert!(entry(n).expect("an entry").managed, "{n:?} managed");
            }
            let kept = entry(&permanent).expect("the permanent entry");
            assert_eq!(kept.state, NeighbourState::Permanent);
            assert!(!kept.managed, "a permanent entry is left alone");
            let journal = std::fs::read_to_string(state.journal_path()).expect("journal");
            assert!(journal.contains("192.0.2.9") && !journal.contains("192.0.2.11"));

            // A reload that no longer wants the IPv6 one: it goes, the rest stays.
            state
                .manage_neighbours(&all[..3])
                .expect("reload without v6");
            assert_eq!(entry(&v6), None);
            assert!(entry(&created).expect("still there").managed);

            state.restore();
            assert_eq!(entry(&created), None, "created by the agent: deleted");
            let back = entry(&learned).expect("a learned entry survives");
            assert!(!back.managed, "no longer managed: {back:?}");
            assert_eq!(back.state, NeighbourState::Stale);
            assert_eq!(back.lladdr, Some(vec![2, 0, 0, 0, 0, 0x0a]));
            let kept = entry(&permanent).expect("the permanent entry");
            assert_eq!(
                (kept.state, kept.managed, kept.lladdr),
                (
                    NeighbourState::Permanent,
                    false,
                    Some(vec![2, 0, 0, 0, 0, 0x0b])
                )
            );
            assert!(!state.journal_path().exists());
            drop(state);
            let _ = std::fs::remove_dir_all(&dir);
        }) else {
            return;
        };
    }
}
