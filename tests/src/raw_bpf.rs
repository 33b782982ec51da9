//! Tiny hand-assembled eBPF programs and one-slot maps, loaded with raw `bpf(2)`
//! calls and attached with `BPF_LINK_CREATE`: no eBPF toolchain and no change to
//! the forwarder's object. The lab wires NIC-like links with them
//! (`Netns::attach_xdp_redirect`), and the benchmarks build their packet
//! generator, sink and restorers from them (`bench/bpf.rs`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context as _, Result, bail};

pub const BPF_MAP_CREATE: libc::c_long = 0;
pub const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_ENABLE_STATS: libc::c_long = 32;
pub const BPF_STATS_RUN_TIME: u32 = 0;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
pub const BPF_PSEUDO_MAP_FD: u8 = 1;
pub const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
pub const HELPER_TAIL_CALL: i32 = 12;
pub const HELPER_XDP_ADJUST_HEAD: i32 = 44;
pub const HELPER_REDIRECT: i32 = 23;
pub const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
pub const BPF_XDP: u32 = 37;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// One eBPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

pub const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (class | size/op | mode/source).
pub const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
pub const LDX_H: u8 = 0x69; // BPF_LDX | BPF_H | BPF_MEM
pub const JEQ_IMM: u8 = 0x15;
pub const ST_W: u8 = 0x62; // BPF_ST | BPF_W | BPF_MEM
pub const ST_H: u8 = 0x6a; // BPF_ST | BPF_H | BPF_MEM
pub const ST_B: u8 = 0x72; // BPF_ST | BPF_B | BPF_MEM
pub const MOV64_REG: u8 = 0xbf;
pub const MOV64_IMM: u8 = 0xb7;
pub const ADD64_IMM: u8 = 0x07;
pub const JGT_REG: u8 = 0x2d;
pub const JNE_IMM: u8 = 0x55;
pub const SUB64_REG: u8 = 0x1f;
pub const RSH64_IMM: u8 = 0x77;
pub const STX_W: u8 = 0x63; // BPF_STX | BPF_W | BPF_MEM
pub const STX_H: u8 = 0x6b; // BPF_STX | BPF_H | BPF_MEM
pub const STX_B: u8 = 0x73; // BPF_STX | BPF_B | BPF_MEM
pub const LD_IMM64: u8 = 0x18;
pub const CALL: u8 = 0x85;
pub const EXIT: u8 = 0x95;

/// `union bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A one-slot map with 4-byte keys and values: a program array or a plain array.
#[derive(Debug)]
pub struct OneSlotMap {
    fd: OwnedFd,
}

impl OneSlotMap {
    fn create(map_type: u32) -> Result<OneSlotMap> {
        let mut attr = MapCreateAttr {
            map_type,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
        };
        let fd = bpf(
            BPF_MAP_CREATE,
            (&mut attr as *mut MapCreateAttr).cast(),
            size_of::<MapCreateAttr>(),
        )
        .context("creating a BPF map")?;
        // SAFETY: new fd owned by nobody else.
        Ok(OneSlotMap {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// A program array whose slot 0 the restorer tail-calls.
    pub fn prog_array() -> Result<OneSlotMap> {
        OneSlotMap::create(BPF_MAP_TYPE_PROG_ARRAY)
    }

    /// A u32 counter.
    pub fn counter() -> Result<OneSlotMap> {
        OneSlotMap::create(BPF_MAP_TYPE_ARRAY)
    }

    /// Slot 0 := `value` (a program fd for a program array).
    pub fn set(&self, value: u32) -> Result<()> {
        let key = 0u32;
        let mut attr = MapUpdateAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        bpf(
            BPF_MAP_UPDATE_ELEM,
            (&mut attr as *mut MapUpdateAttr).cast(),
            size_of::<MapUpdateAttr>(),
        )
        .context("updating a BPF map")?;
        Ok(())
    }

    /// The two instructions that load this map's address into `dst`.
    pub fn load(&self, dst: u8) -> [Insn; 2] {
        [
            insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, self.fd.as_raw_fd()),
            insn(0, 0, 0, 0, 0),
        ]
    }
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (the XDP part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> std::io::Result<i32> {
    // SAFETY: attr points at a live, correctly laid out attribute of `size` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as u32) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

/// A loaded XDP program.
#[derive(Debug)]
pub struct RawProg {
    fd: OwnedFd,
}

impl AsFd for RawProg {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl RawProg {
    /// Loads `insns` as XDP program `name` (at most 15 bytes are kept).
    pub fn load(name: &str, insns: &[Insn]) -> Result<RawProg> {
        RawProg::load_for(name, insns, 0)
    }

    /// As `load`, with an expected attach type: a program array only takes
    /// programs whose expected attach type equals its first user's, and aya loads
    /// the datapath's XDP programs with `BPF_XDP`.
    pub fn load_for(name: &str, insns: &[Insn], expected_attach_type: u32) -> Result<RawProg> {
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name,
            expected_attach_type,
            ..Default::default()
        };
        match bpf(
            BPF_PROG_LOAD,
            (&mut attr as *mut ProgLoadAttr).cast(),
            size_of::<ProgLoadAttr>(),
        ) {
            // SAFETY: the kernel returned a new fd that nothing else owns.
            Ok(fd) => Ok(RawProg {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
            }),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "loading XDP program {name}: {e}\nverifier log:\n{}",
                    String::from_utf8_lossy(&log[..end])
                )
            }
        }
    }

    /// Attaches the program in driver (native) mode to interface `ifindex` of the
    /// caller's network namespace (call from a thread inside the lab namespace).
    /// Detached when the link is dropped.
    pub fn attach(&self, ifindex: u32) -> Result<XdpLink> {
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
            ..Default::default()
        };
        let fd = bpf(
            BPF_LINK_CREATE,
            (&mut attr as *mut LinkCreateAttr).cast(),
            size_of::<LinkCreateAttr>(),
        )
        .with_context(|| format!("attaching XDP (driver mode) to ifindex {ifindex}"))?;
        // SAFETY: new fd owned by nobody else.
        Ok(XdpLink {
            _fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }
}

/// Turns on the kernel's run-time statistics of every BPF program
/// (`BPF_ENABLE_STATS`) for as long as the returned fd is open: no global sysctl to
/// restore.
pub fn enable_run_stats() -> Result<OwnedFd> {
    let mut attr = [0u8; 8];
    attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    let fd = bpf(BPF_ENABLE_STATS, attr.as_mut_ptr(), attr.len())
        .context("enabling BPF run-time statistics")?;
    // SAFETY: new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An XDP attachment through a bpf_link: closing the fd detaches, in any namespace.
#[derive(Debug)]
pub struct XdpLink {
    _fd: OwnedFd,
}

/// `return bpf_redirect(ifindex, 0);`: every frame leaves by interface `ifindex` as
/// an XDP frame.
pub fn redirect(ifindex: u32) -> Result<RawProg> {
    RawProg::load_for(
        "lab_wire",
        &[
            insn(MOV64_IMM, 1, 0, 0, ifindex as i32),
            insn(MOV64_IMM, 2, 0, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_REDIRECT),
            insn(EXIT, 0, 0, 0, 0),
        ],
        BPF_XDP,
    )
}
