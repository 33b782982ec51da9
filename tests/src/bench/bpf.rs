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

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use forwarder::datapath::test_run::{BPF_F_TEST_XDP_LIVE_FRAMES, TestRunOptions, test_run_xdp};
use forwarder_tests::raw_bpf::*;

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
