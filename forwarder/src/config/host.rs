//! The host's interfaces and their addresses, for the checks only `run` can make.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Context;
use netlink_packet_core::Parseable as _;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};

use crate::netlink::{Rtnl, interface_name, link_names};

/// Every interface of the current network namespace (including those without an IP
/// address) with the IPv4/IPv6 addresses it carries (IPv4 first), from route
/// netlink: a link dump (`RTM_GETLINK`) and an address dump (`RTM_GETADDR`).
/// An address is listed under its interface's name (an IPv4 label such as `eth0:1`
/// is not an interface of its own).
pub fn interface_addresses() -> anyhow::Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut rtnl = Rtnl::open().context("reading interface addresses")?;
    let names = link_names(&mut rtnl)?;
    let mut addrs_by_interface: BTreeMap<String, Vec<IpAddr>> = names
        .values()
        .map(|name| (name.clone(), Vec::new()))
        .collect();
    let replies = rtnl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .context("listing addresses (RTM_GETADDR)")?;
    for reply in replies {
        if reply.message_type != libc::RTM_NEWADDR {
            continue;
        }
        let message =
            AddressMessage::parse(reply.payload.as_slice()).context("parsing an address")?;
        // As getifaddrs: IFA_LOCAL is the interface's own address where it differs
        // from IFA_ADDRESS (the peer's, on point-to-point links).
        let mut local = None;
        let mut address = None;
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(addr) => local = Some(*addr),
                AddressAttribute::Address(addr) => address = Some(*addr),
                _ => {}
            }
        }
        let Some(addr) = local.or(address) else {
            continue;
        };
        let index = message.header.index;
        let name = match names.get(&index) {
            Some(name) => name.clone(),
            // A link that appeared between the two dumps.
            None => match interface_name(index) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        let addrs = addrs_by_interface.entry(name).or_default();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    for addrs in addrs_by_interface.values_mut() {
        addrs.sort_by_key(IpAddr::is_ipv6); // stable: the kernel's order otherwise
    }
    Ok(addrs_by_interface)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn loopback_carries_127_0_0_1() {
        let addrs = interface_addresses().expect("interface addresses");
        let loopback = addrs.get("lo").expect("every network namespace has lo");
        assert!(
            loopback.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{loopback:?}"
        );
    }
}

#[cfg(test)]
mod netns_tests {
    use std::net::IpAddr;

    use super::interface_addresses;
    use crate::netlink::test_netns::{addr as ip, in_new_netns, veth_lab};

    #[test]
    fn lists_every_interface_with_its_addresses_ipv4_first() {
        let Some(addrs) = in_new_netns(|| {
            veth_lab();
            interface_addresses().expect("interface addresses")
        }) else {
            return;
        };
        assert_eq!(
            addrs.keys().collect::<Vec<_>>(),
            ["lo", "veth0", "veth1"],
            "{addrs:?}"
        );
        assert_eq!(addrs["lo"], [ip("127.0.0.1"), ip("::1")]);
        let veth0 = &addrs["veth0"];
        assert_eq!(
            veth0[..2],
            [ip("192.0.2.1"), ip("2001:db8::1")],
            "{veth0:?}"
        );
        assert!(
            veth0[2..]
                .iter()
                .all(|a| matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local())),
            "{veth0:?}"
        );
        // veth1 carries at most its link-local address (once it has one).
        assert!(addrs["veth1"].iter().all(IpAddr::is_ipv6), "{addrs:?}");
    }
}
