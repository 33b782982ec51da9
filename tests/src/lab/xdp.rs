//! The XDP_PASS stub for veth peers that receive native-mode XDP_REDIRECT / XDP_TX
//! traffic, and the redirect program that joins the veths of a NIC-like link
//! (`Links::NicLike`).

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

use super::Netns;
use crate::raw_bpf::{self, RawProg, XdpLink};

/// Name of the stub program in the forwarder's eBPF object.
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";

/// An XDP program attached in driver (native) mode to one interface of one
/// namespace: `xdp_pass`, or a lab wire's redirect. Dropping it detaches the program
/// (from a thread inside that namespace).
#[derive(Debug)]
pub struct XdpStub {
    attached: Option<Attached>,
    netns: Netns,
    ifname: String,
}

/// What keeps a stub's program attached.
#[derive(Debug)]
enum Attached {
    /// `xdp_pass` from the forwarder's object, attached by aya.
    Object { _ebpf: Ebpf },
    /// A program loaded from raw instructions: its bpf_link (closing it detaches)
    /// and the program.
    Link { _link: XdpLink, _prog: RawProg },
}

impl XdpStub {
    /// The namespace of the interface.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The interface the stub is attached to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

impl Drop for XdpStub {
    fn drop(&mut self) {
        let Some(ebpf) = self.attached.take() else {
            return;
        };
        // With a bpf_link attachment (kernel >= 5.9) closing the link fd detaches, in
        // any namespace. aya falls back to netlink on older kernels, whose detach names
        // the interface by index in the *current* namespace: drop it inside the lab
        // namespace so it can never act on a host interface.
        let mut slot = Some(ebpf);
        let dropped = self.netns.run_in(|| drop(slot.take()));
        if dropped.is_err()
            && let Some(ebpf) = slot
        {
            // The namespace is gone, and with it the interface; leak rather than
            // risk a detach addressed to the host namespace.
            std::mem::forget(ebpf);
        }
    }
}

impl Netns {
    /// Loads `xdp_pass` from `forwarder::ebpf::object_bytes()` and attaches it to
    /// `ifname` of this namespace in driver mode (`XdpMode::Driver`), from a thread
    /// inside the namespace (interface names resolve in the caller's namespace).
    pub fn attach_xdp_pass(&self, ifname: &str) -> Result<XdpStub> {
        let bytes = forwarder::ebpf::object_bytes();
        if bytes.is_empty() {
            bail!(
                "the forwarder eBPF object is empty (built with AYA_BUILD_SKIP=1?); \
                 the XDP_PASS stub needs the real object"
            );
        }
        let ebpf = self.run_in(|| -> Result<Ebpf> {
            let mut ebpf = Ebpf::load(bytes).context("loading the forwarder eBPF object")?;
            let program: &mut Xdp = ebpf
                .program_mut(XDP_PASS_PROGRAM)
                .with_context(|| format!("no program {XDP_PASS_PROGRAM} in the eBPF object"))?
                .try_into()
                .with_context(|| format!("{XDP_PASS_PROGRAM} is not an XDP program"))?;
            program
                .load()
                .with_context(|| format!("loading {XDP_PASS_PROGRAM} into the kernel"))?;
            program.attach(ifname, XdpMode::Driver).with_context(|| {
                format!(
                    "attaching {XDP_PASS_PROGRAM} to {ifname} in {} (driver mode)",
                    self.name()
                )
            })?;
            Ok(ebpf)
        })??;
        Ok(XdpStub {
            attached: Some(Attached::Object { _ebpf: ebpf }),
            netns: self.clone(),
            ifname: ifname.to_owned(),
        })
    }

    /// Attaches to `ifname` of this namespace (driver mode) a program that sends
    /// every frame it receives out of `target`, another veth of this namespace,
    /// with `bpf_redirect`: the frame leaves as an XDP frame, so the veth at the
    /// other end of `target` takes it as a NIC driver hands frames to XDP (no skb).
    /// Four instructions (`raw_bpf::redirect`): the lab's wiring is not part of the
    /// forwarder's object.
    pub fn attach_xdp_redirect(&self, ifname: &str, target: &str) -> Result<XdpStub> {
        let attached = self.run_in(|| -> Result<Attached> {
            let (from, to) = (
                forwarder::datapath::ifindex(ifname)?,
                forwarder::datapath::ifindex(target)?,
            );
            let prog = raw_bpf::redirect(to).context("loading the lab wire's redirect")?;
            let link = prog
                .attach(from)
                .context("attaching the lab wire's redirect")?;
            Ok(Attached::Link {
                _link: link,
                _prog: prog,
            })
        })??;
        Ok(XdpStub {
            attached: Some(attached),
            netns: self.clone(),
            ifname: ifname.to_owned(),
        })
    }
}
