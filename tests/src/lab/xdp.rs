//! The XDP_PASS stub for veth peers that receive native-mode XDP_REDIRECT / XDP_TX
//! traffic, and the redirect program that joins the veths of a NIC-like link
//! (`Links::NicLike`).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

use super::Netns;

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
    Link { _link: OwnedFd, _prog: OwnedFd },
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
    /// Four instructions, loaded from this crate: the lab's wiring is not part of
    /// the forwarder's object.
    pub fn attach_xdp_redirect(&self, ifname: &str, target: &str) -> Result<XdpStub> {
        let ifname_c = std::ffi::CString::new(ifname)?;
        let target_c = std::ffi::CString::new(target)?;
        let attached = self.run_in(|| -> Result<Attached> {
            // SAFETY: NUL-terminated names.
            let (from, to) = unsafe {
                (
                    libc::if_nametoindex(ifname_c.as_ptr()),
                    libc::if_nametoindex(target_c.as_ptr()),
                )
            };
            if from == 0 || to == 0 {
                bail!("no interface {ifname} or {target} in {}", self.name());
            }
            let prog = load_redirect(to)?;
            let link = attach_link(&prog, from)?;
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

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_FUNC_REDIRECT: i32 = 23;
const XDP_FLAGS_DRV_MODE: u32 = 4;

/// `bpf(2)` with a zero-padded attribute block (the kernel requires the unused
/// tail to be zero).
fn bpf(cmd: libc::c_long, attr: &[u32; 32]) -> Result<OwnedFd> {
    // SAFETY: `attr` is a valid, fully initialised attribute block of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr) as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(2)");
    }
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `return bpf_redirect(ifindex, 0);` as an XDP program.
fn load_redirect(ifindex: u32) -> Result<OwnedFd> {
    let insns = [
        // r1 = ifindex; r2 = 0
        Insn {
            code: 0xb7,
            regs: 1,
            off: 0,
            imm: ifindex as i32,
        },
        Insn {
            code: 0xb7,
            regs: 2,
            off: 0,
            imm: 0,
        },
        // call bpf_redirect; exit (r0: its verdict)
        Insn {
            code: 0x85,
            regs: 0,
            off: 0,
            imm: BPF_FUNC_REDIRECT,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut attr = [0u32; 32];
    attr[0] = BPF_PROG_TYPE_XDP;
    attr[1] = insns.len() as u32;
    let insns_ptr = insns.as_ptr() as u64;
    attr[2] = insns_ptr as u32;
    attr[3] = (insns_ptr >> 32) as u32;
    let license_ptr = license.as_ptr() as u64;
    attr[4] = license_ptr as u32;
    attr[5] = (license_ptr >> 32) as u32;
    // log_level, log_size, log_buf (2 words), kern_version, prog_flags: zero;
    // prog_name: 16 bytes at word 12; prog_ifindex at 16; expected_attach_type at 17.
    attr[12..14].copy_from_slice(&[u32::from_ne_bytes(*b"lab_"), u32::from_ne_bytes(*b"wire")]);
    attr[17] = BPF_XDP;
    bpf(BPF_PROG_LOAD, &attr).context("loading the lab wire's redirect program")
}

/// A bpf_link attaching XDP program `prog` to interface `ifindex` in driver mode.
fn attach_link(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = [0u32; 32];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = ifindex;
    attr[2] = BPF_XDP;
    attr[3] = XDP_FLAGS_DRV_MODE;
    bpf(BPF_LINK_CREATE, &attr).context("attaching the lab wire's redirect program")
}
