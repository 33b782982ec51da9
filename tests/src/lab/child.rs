//! Child processes inside a namespace, and `Command::output_ok`.

use std::{
    process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// `Command` helpers.
pub trait OutputOk {
    /// Runs the command to completion (stdout and stderr captured); returns stdout
    /// (lossy UTF-8) if it exited 0, otherwise an error naming the command, its exit
    /// status and its stderr.
    fn output_ok(&mut self) -> Result<String>;
}

impl OutputOk for Command {
    fn output_ok(&mut self) -> Result<String> {
        let output = self.output().with_context(|| format!("running {self:?}"))?;
        check_output(self, output)
    }
}

fn check_output(cmd: &Command, output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The child and whether it has been reaped (after which its pid may be reused and
/// must not be signalled).
#[derive(Debug)]
pub(crate) struct SharedChild {
    child: Child,
    status: Option<ExitStatus>,
}

impl SharedChild {
    pub(crate) fn new(child: Child) -> Self {
        Self {
            child,
            status: None,
        }
    }

    fn signal_group(&self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: the child is not reaped yet, so its pid (== its process group id, see
        // `process_group(0)`) still names our child and cannot have been reused.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("waiting for a child")?;
        }
        Ok(self.status)
    }

    fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.wait().context("waiting for a child")?;
        self.status = Some(status);
        Ok(status)
    }

    /// SIGKILL to the whole process group, then reap. Never fails (used from Drop).
    pub(crate) fn kill_and_reap(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal_group(libc::SIGKILL);
        let _ = self.wait();
    }
}

/// A process running inside a lab namespace ([`Netns::spawn`](super::Netns::spawn)).
/// Dropping it kills its process group (SIGKILL) and reaps it; so does dropping the
/// [`Lab`](super::Lab), before the namespaces go away.
#[derive(Debug)]
pub struct NsChild {
    inner: Arc<Mutex<SharedChild>>,
    ns: String,
}

impl NsChild {
    pub(crate) fn new(inner: Arc<Mutex<SharedChild>>, ns: String) -> Self {
        Self { inner, ns }
    }

    fn lock(&self) -> MutexGuard<'_, SharedChild> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process id (also its process group id).
    pub fn id(&self) -> u32 {
        self.lock().child.id()
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// Takes its stdout pipe, if the command was set up with `Stdio::piped()`.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.lock().child.stdout.take()
    }

    /// Takes its stderr pipe, if the command was set up with `Stdio::piped()`.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.lock().child.stderr.take()
    }

    /// The exit status if it has exited (non-blocking).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.lock().try_wait()
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.lock().wait()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to its process group, unless it has been
    /// reaped already.
    pub fn signal(&self, signal: libc::c_int) {
        self.lock().signal_group(signal);
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL. Returns its exit
    /// status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// SIGKILL to its process group, then reaps it. Returns its exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.lock();
        child.kill_and_reap();
        child.wait()
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        self.lock().kill_and_reap();
    }
}
