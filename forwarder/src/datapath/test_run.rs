//! `BPF_PROG_TEST_RUN` for XDP programs: run a loaded program on a crafted frame and
//! get the verdict, the frame as the program left it, and the kernel-measured time.
//! Used by the datapath tests (exact bytes in, exact bytes out) and the benchmarks.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context as _, bail};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Run the frames through the real XDP driver path (redirects and XDP_TX take
/// effect): the benchmarks' packet generator.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// The `test` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as a test-run context: lets a test choose the ingress interface.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The program's return value (an `xdp_action`).
    pub verdict: u32,
    /// The frame after the program ran (head adjustments included).
    pub frame: Vec<u8>,
    /// Average nanoseconds per run, as the kernel measured it.
    pub duration_ns: u32,
}

/// Options of one test run.
#[derive(Debug, Clone, Default)]
pub struct TestRunOptions {
    /// How many times the kernel runs the program (0 or 1: once).
    pub repeat: u32,
    /// `BPF_F_TEST_XDP_LIVE_FRAMES` and friends.
    pub flags: u32,
    /// Frames per batch in live-frames mode (0: kernel default).
    pub batch_size: u32,
    /// Ingress interface (must exist in the caller's network namespace); 0: none.
    pub ingress_ifindex: u32,
}

/// Runs `prog` (an XDP program fd) on `frame`.
pub fn test_run_xdp(
    prog: impl AsFd,
    frame: &[u8],
    opts: &TestRunOptions,
) -> anyhow::Result<TestRunOutput> {
    // Room for programs that grow the frame (bpf_xdp_adjust_head adds up to 256 bytes).
    let mut out = vec![0u8; frame.len() + 512];
    let mut ctx = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: opts.ingress_ifindex,
        ..Default::default()
    };
    let use_ctx = opts.ingress_ifindex != 0 || opts.flags & BPF_F_TEST_XDP_LIVE_FRAMES != 0;
    let live = opts.flags & BPF_F_TEST_XDP_LIVE_FRAMES != 0;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        // Live frames are not copied back.
        data_size_out: if live { 0 } else { out.len() as u32 },
        data_out: if live { 0 } else { out.as_mut_ptr() as u64 },
        repeat: opts.repeat,
        flags: opts.flags,
        batch_size: opts.batch_size,
        ..Default::default()
    };
    if use_ctx {
        attr.ctx_size_in = size_of::<XdpMd>() as u32;
        attr.ctx_in = &mut ctx as *mut XdpMd as u64;
    }
    // SAFETY: attr points at valid buffers that outlive the call; the kernel writes
    // at most data_size_out bytes into `out`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>() as u32,
        )
    };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "BPF_PROG_TEST_RUN failed: {err} (frame of {} bytes)",
            frame.len()
        );
    }
    if !live && attr.data_size_out as usize > out.len() {
        bail!("BPF_PROG_TEST_RUN: output larger than the buffer");
    }
    out.truncate(if live { 0 } else { attr.data_size_out as usize });
    Ok(TestRunOutput {
        verdict: attr.retval,
        frame: out,
        duration_ns: attr.duration,
    })
}

/// Convenience: one run, no options.
pub fn run_once(prog: impl AsFd, frame: &[u8]) -> anyhow::Result<TestRunOutput> {
    test_run_xdp(prog, frame, &TestRunOptions::default()).context("test run")
}
