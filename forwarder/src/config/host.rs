//! The host's interfaces and their addresses, for the checks only `run` can make.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;

/// Every interface of the current network namespace (including those without an IP
/// address) with the IPv4/IPv6 addresses it carries, from `getifaddrs(3)`.
pub fn interface_addresses() -> anyhow::Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer; on success it owns a linked list that we
    // free exactly once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs failed");
    }
    let mut addrs_by_interface: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a non-null node of the list returned by getifaddrs, which
        // stays valid until freeifaddrs.
        let ifaddr = unsafe { &*entry };
        entry = ifaddr.ifa_next;
        if ifaddr.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifaddr.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let addrs = addrs_by_interface.entry(name).or_default();
        // SAFETY: ifa_addr is null or points to a sockaddr whose family says its real type.
        if let Some(addr) = unsafe { sockaddr_to_ip(ifaddr.ifa_addr) }
            && !addrs.contains(&addr)
        {
            addrs.push(addr);
        }
    }
    // SAFETY: `list` came from a successful getifaddrs and is not used after this.
    unsafe { libc::freeifaddrs(list) };
    Ok(addrs_by_interface)
}

/// # Safety
/// `addr` must be null or point to a valid socket address of the type its family names.
unsafe fn sockaddr_to_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees `addr` is valid; the family selects the real type.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let v4 = &*(addr as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*(addr as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_carries_127_0_0_1() {
        let addrs = interface_addresses().expect("getifaddrs");
        let loopback = addrs.get("lo").expect("every network namespace has lo");
        assert!(
            loopback.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{loopback:?}"
        );
    }
}
