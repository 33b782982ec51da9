//! Tiny hand-assembled XDP programs for the benchmarks, loaded with
//! `bpf(BPF_PROG_LOAD)` and attached with `BPF_LINK_CREATE` (no eBPF toolchain, no
//! change to the datapath object):
//!
//! * the **generator**: writes a fixed frame over the packet and returns `XDP_TX`.
//!   Run with `BPF_PROG_TEST_RUN` + `BPF_F_TEST_XDP_LIVE_FRAMES` and the client
//!   veth as ingress interface, every repetition transmits the frame out of that
//!   veth: a packet generator in the kernel, one syscall per batch of frames.
//!   It rewrites the whole frame every time because live-frame pages are recycled
//!   without resetting their contents, and the forwarder rewrites headers in place;
//! * the **sink**: `XDP_DROP`, attached to the origin's veth, where the interface's
//!   `rx_packets` counts every frame that arrived;
//! * the **restorer**: puts the frame it was built for back in place (head and
//!   bytes), then tail-calls the program in slot 0 of a program array. Run with
//!   `BPF_PROG_TEST_RUN` and a large `repeat`, it lets the datapath rewrite the
//!   same frame again and again in one syscall (the kernel does not restore the
//!   frame between repetitions): the hot-loop cost of a rewrite is the run time
//!   through the restorer minus the run time of the restorer tail-calling the
//!   trivial program. With a counter map it also gives every repetition another
//!   client port (and last address byte): a new flow each time.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use forwarder::datapath::test_run::{BPF_F_TEST_XDP_LIVE_FRAMES, TestRunOptions, test_run_xdp};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_TAIL_CALL: i32 = 12;
const HELPER_XDP_ADJUST_HEAD: i32 = 44;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// One eBPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (class | size/op | mode/source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const LDX_H: u8 = 0x69; // BPF_LDX | BPF_H | BPF_MEM
const JEQ_IMM: u8 = 0x15;
const ST_W: u8 = 0x62; // BPF_ST | BPF_W | BPF_MEM
const ST_H: u8 = 0x6a; // BPF_ST | BPF_H | BPF_MEM
const ST_B: u8 = 0x72; // BPF_ST | BPF_B | BPF_MEM
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const JGT_REG: u8 = 0x2d;
const JNE_IMM: u8 = 0x55;
const SUB64_REG: u8 = 0x1f;
const RSH64_IMM: u8 = 0x77;
const STX_W: u8 = 0x63; // BPF_STX | BPF_W | BPF_MEM
const STX_H: u8 = 0x6b; // BPF_STX | BPF_H | BPF_MEM
const STX_B: u8 = 0x73; // BPF_STX | BPF_B | BPF_MEM
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// Instructions that write `frame` at the packet start held in r2, as immediate
/// stores of 4, 2 and 1 bytes (bounds checked by the caller).
fn store_frame(frame: &[u8]) -> Vec<Insn> {
    let len = frame.len();
    let mut stores = Vec::new();
    let mut off = 0usize;
    while off + 4 <= len {
        let w = u32::from_ne_bytes(frame[off..off + 4].try_into().expect("4 bytes"));
        stores.push(insn(ST_W, 2, 0, off as i16, w as i32));
        off += 4;
    }
    if off + 2 <= len {
        let h = u16::from_ne_bytes(frame[off..off + 2].try_into().expect("2 bytes"));
        stores.push(insn(ST_H, 2, 0, off as i16, h as i32));
        off += 2;
    }
    if off < len {
        stores.push(insn(ST_B, 2, 0, off as i16, frame[off] as i32));
    }
    stores
}

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
    fn load(&self, dst: u8) -> [Insn; 2] {
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
    fn load(name: &str, insns: &[Insn]) -> Result<RawProg> {
        RawProg::load_for(name, insns, 0)
    }

    /// As `load`, with an expected attach type: a program array only takes
    /// programs whose expected attach type equals its first user's, and aya loads
    /// the datapath's XDP programs with `BPF_XDP`.
    fn load_for(name: &str, insns: &[Insn], expected_attach_type: u32) -> Result<RawProg> {
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

    /// The origin's sink: `XDP_DROP` for everything but ARP, which passes so that
    /// the edge can still resolve the origin's address.
    pub fn sink() -> Result<RawProg> {
        RawProg::load(
            "bench_sink",
            &[
                insn(LDX_W, 2, 1, 0, 0),
                insn(LDX_W, 3, 1, 4, 0),
                insn(MOV64_REG, 4, 2, 0, 0),
                insn(ADD64_IMM, 4, 0, 0, 14),
                insn(JGT_REG, 4, 3, 2, 0),
                insn(LDX_H, 5, 2, 12, 0),
                insn(JEQ_IMM, 5, 0, 2, 0x0608),
                // drop:
                insn(MOV64_IMM, 0, 0, 0, XDP_DROP as i32),
                insn(EXIT, 0, 0, 0, 0),
                // pass (ARP, ethertype 0x0806 read little-endian):
                insn(MOV64_IMM, 0, 0, 0, XDP_PASS as i32),
                insn(EXIT, 0, 0, 0, 0),
            ],
        )
    }

    /// Writes `frame` over the packet (which must be at least as long) and returns
    /// `XDP_TX`; a shorter packet is aborted.
    pub fn generator(frame: &[u8]) -> Result<RawProg> {
        let len = frame.len();
        if len > 1500 {
            bail!("generator frame of {len} bytes is too long");
        }
        let body = store_frame(frame);
        let mut p = vec![
            // r2 = ctx->data; r3 = ctx->data_end
            insn(LDX_W, 2, 1, 0, 0),
            insn(LDX_W, 3, 1, 4, 0),
            // if r2 + len > r3 goto abort
            insn(MOV64_REG, 4, 2, 0, 0),
            insn(ADD64_IMM, 4, 0, 0, len as i32),
            insn(JGT_REG, 4, 3, (body.len() + 2) as i16, 0),
        ];
        p.extend(body);
        p.extend([
            insn(MOV64_IMM, 0, 0, 0, XDP_TX as i32),
            insn(EXIT, 0, 0, 0, 0),
            // abort:
            insn(MOV64_IMM, 0, 0, 0, XDP_ABORTED as i32),
            insn(EXIT, 0, 0, 0, 0),
        ]);
        RawProg::load("bench_gen", &p)
    }

    /// The restorer for `frame` (see the module docs): puts the packet head back
    /// `frame.len()` bytes before its (unchanged) end, writes `frame` there and
    /// tail-calls slot 0 of `target`. With `counter`, repetition `n` carries
    /// client port `n & 0xffff` and client address last byte `n >> 16` (an IPv4
    /// frame without options): a new flow every time. Aborts (`XDP_ABORTED`) if
    /// any step fails.
    pub fn restorer(
        frame: &[u8],
        target: &OneSlotMap,
        counter: Option<&OneSlotMap>,
    ) -> Result<RawProg> {
        let len = frame.len();
        if len > 1500 {
            bail!("restorer frame of {len} bytes is too long");
        }
        let mut p = vec![
            insn(MOV64_REG, 6, 1, 0, 0),
            // r3 = data_end - data - len: the head's way back to the frame's start.
            insn(LDX_W, 2, 6, 0, 0),
            insn(LDX_W, 3, 6, 4, 0),
            insn(SUB64_REG, 3, 2, 0, 0),
            insn(ADD64_IMM, 3, 0, 0, -(len as i32)),
            insn(MOV64_REG, 1, 6, 0, 0),
            insn(MOV64_REG, 2, 3, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_XDP_ADJUST_HEAD),
        ];
        // Jumps to `abort` are patched once its position is known.
        let mut to_abort = vec![p.len()];
        p.push(insn(JNE_IMM, 0, 0, 0, 0));
        if let Some(counter) = counter {
            p.extend([insn(ST_W, 10, 0, -4, 0)]);
            p.extend(counter.load(1));
            p.extend([
                insn(MOV64_REG, 2, 10, 0, 0),
                insn(ADD64_IMM, 2, 0, 0, -4),
                insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
            ]);
            to_abort.push(p.len());
            p.push(insn(JEQ_IMM, 0, 0, 0, 0));
            p.extend([
                insn(LDX_W, 7, 0, 0, 0),
                insn(ADD64_IMM, 7, 0, 0, 1),
                insn(STX_W, 0, 7, 0, 0),
            ]);
        }
        p.extend([
            insn(LDX_W, 2, 6, 0, 0),
            insn(LDX_W, 3, 6, 4, 0),
            insn(MOV64_REG, 4, 2, 0, 0),
            insn(ADD64_IMM, 4, 0, 0, len as i32),
        ]);
        to_abort.push(p.len());
        p.push(insn(JGT_REG, 4, 3, 0, 0));
        p.extend(store_frame(frame));
        if counter.is_some() {
            // UDP source port (offset 34) := n (its bytes as they fall: any order
            // makes distinct ports); last address byte (offset 29) := n >> 16.
            p.extend([
                insn(STX_H, 2, 7, 34, 0),
                insn(RSH64_IMM, 7, 0, 0, 16),
                insn(STX_B, 2, 7, 29, 0),
            ]);
        }
        p.extend([insn(MOV64_REG, 1, 6, 0, 0)]);
        p.extend(target.load(2));
        p.extend([
            insn(MOV64_IMM, 3, 0, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_TAIL_CALL),
        ]);
        let abort = p.len();
        p.extend([
            insn(MOV64_IMM, 0, 0, 0, XDP_ABORTED as i32),
            insn(EXIT, 0, 0, 0, 0),
        ]);
        for at in to_abort {
            p[at].off = (abort - at - 1) as i16;
        }
        RawProg::load_for("bench_restore", &p, BPF_XDP)
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

/// What one generator run did.
#[derive(Debug, Clone, Copy)]
pub struct Generated {
    /// Wall time from before the first frame to the stop signal.
    pub elapsed: Duration,
}

extern "C" fn on_stop(_: libc::c_int) {}

/// Installs a no-op SIGUSR1 handler (once): the signal only interrupts the
/// generator's test run, which the kernel ends with EINTR.
fn install_stop_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
    });
}

/// Runs the generator `prog` with live frames, transmitting `frame` out of interface
/// `ifindex` (of the namespace of `ns`), from a thread inside that namespace pinned
/// to `cpu`, for `duration`.
///
/// One test run with a large `repeat` does all the work: the kernel sets up and
/// tears down its page pool per syscall, and the teardown waits for an RCU grace
/// period (tens of ms on a busy machine), so short runs would leave the generator
/// idle most of the time. The run is ended by a signal (EINTR) at the deadline,
/// sent again until the thread has returned; `repeat` bounds it anyway.
pub fn generate(
    ns: &forwarder_tests::Netns,
    cpu: usize,
    prog: &RawProg,
    ifindex: u32,
    frame: &[u8],
    duration: Duration,
    max_frames: u64,
) -> Result<Generated> {
    use std::sync::atomic::{AtomicI32, Ordering};
    install_stop_handler();
    let tid = AtomicI32::new(0);
    let opts = TestRunOptions {
        repeat: u32::try_from(max_frames).unwrap_or(u32::MAX),
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: 64,
        ingress_ifindex: ifindex,
    };
    std::thread::scope(|scope| -> Result<Generated> {
        let (tid, opts) = (&tid, &opts);
        let worker = scope.spawn(move || {
            ns.run_in(|| -> Result<()> {
                super::sys::pin(0, cpu)?;
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                match test_run_xdp(prog, frame, opts) {
                    Ok(_) => Ok(()),
                    Err(e) if format!("{e:#}").contains("Interrupted") => Ok(()),
                    Err(e) => Err(e.context("live-frames test run")),
                }
            })?
        });
        let start = Instant::now();
        while tid.load(Ordering::SeqCst) == 0 && !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let run_start = Instant::now();
        std::thread::sleep(duration);
        let mut elapsed = run_start.elapsed();
        let t = tid.load(Ordering::SeqCst);
        // Bounded: the deadline plus at most 10 s of re-signalling.
        for _ in 0..1000 {
            if worker.is_finished() {
                break;
            }
            if t != 0 {
                // SAFETY: signals one thread of this process.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), t, libc::SIGUSR1);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !worker.is_finished() {
            bail!("the generator did not stop");
        }
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("the generator thread panicked"))??;
        if t == 0 {
            elapsed = start.elapsed();
        }
        Ok(Generated { elapsed })
    })
}
