//! A handle on one named network namespace (`/run/netns/<name>`): commands, threads
//! and async tasks that run inside it.

use std::{
    ffi::OsStr,
    fs::File,
    future::Future,
    io::Write as _,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, Weak, mpsc},
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::child::{NsChild, OutputOk as _, SharedChild};

/// Directory where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Children spawned through [`Netns::spawn`] that the lab kills before it deletes the
/// namespace (weak: an [`NsChild`] dropped earlier already killed and reaped its
/// process).
pub(crate) type ChildRegistry = Arc<Mutex<Vec<Weak<Mutex<SharedChild>>>>>;

/// A named network namespace. Cheap to clone; clones share the registry of spawned
/// children. The namespace itself belongs to the [`Lab`](super::Lab) that created it:
/// a handle that outlives its lab only produces errors.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    pub(crate) children: ChildRegistry,
}

impl Netns {
    pub(crate) fn new(name: String) -> Self {
        Self {
            name,
            children: Arc::default(),
        }
    }

    /// The namespace name (`ip netns list`, `ip -n <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Opens the namespace file (the fd `setns(2)` takes).
    pub fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))
    }

    /// `ip netns exec <name> <program> <args…>`: a command that runs inside the
    /// namespace. Configure it further (stdin, env…) and run it with `output_ok()`
    /// ([`OutputOk`](super::OutputOk)), `status()`, or [`Netns::spawn`].
    pub fn cmd<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        cmd
    }

    /// nginx in the foreground in the namespace, with `prefix/nginx.conf` as its
    /// config, `prefix` as its prefix and `prefix/error.log` as its error log;
    /// output discarded. Start it with [`Netns::spawn`].
    pub fn nginx(&self, prefix: &Path) -> Command {
        let d = prefix.display();
        let mut cmd = self.cmd(
            "nginx",
            &[
                "-p",
                &d.to_string(),
                "-c",
                &format!("{d}/nginx.conf"),
                "-e",
                &format!("{d}/error.log"),
                "-g",
                "daemon off;",
            ],
        );
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }

    /// Runs `program args…` in the namespace; stdout on success, an error with the
    /// exit status and stderr otherwise.
    pub fn run<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Result<String> {
        self.cmd(program, args).output_ok()
    }

    /// Runs `ip -n <name> <args…>` (no `ip netns exec` indirection); stdout on success.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        cmd.output_ok()
    }

    /// Runs several `ip` commands (one per line, without the leading `ip`) with a
    /// single `ip -n <name> -batch -`; stops at the first failing line.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> Result<()> {
        let script: String = lines.iter().map(|l| format!("{}\n", l.as_ref())).collect();
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning `ip -batch`")?;
        let mut stdin = child.stdin.take().context("ip -batch has no stdin")?;
        stdin
            .write_all(script.as_bytes())
            .context("writing the ip batch")?;
        drop(stdin);
        let output = child
            .wait_with_output()
            .context("waiting for `ip -batch`")?;
        if !output.status.success() {
            bail!(
                "ip -n {} -batch failed ({}): {}\nbatch was:\n{script}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Writes a sysctl inside the namespace (`key` in dotted form, e.g.
    /// `net.ipv4.ip_forward`), from a thread that entered it (`/proc/sys/net` shows the
    /// writing thread's namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run_in(|| std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Reads a sysctl inside the namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = self
            .run_in(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("reading sysctl {key} in {}", self.name))?;
        Ok(value.trim().to_owned())
    }

    /// One ICMP echo (`ping -c1 -W2`, IPv4 or IPv6) from this namespace.
    pub fn ping(&self, dst: IpAddr) -> Result<()> {
        self.run("ping", &["-n", "-c1", "-W2", &dst.to_string()])
            .with_context(|| format!("ping {dst} from {}", self.name))
            .map(drop)
    }

    /// Spawns `cmd` as a child that is killed (its whole process group, SIGKILL) when
    /// the returned [`NsChild`] is dropped, or when the lab is dropped, whichever comes
    /// first. `cmd` must come from [`Netns::cmd`] (checked: a command that would run in
    /// the host namespace is refused). It is put in a process group of its own.
    pub fn spawn(&self, mut cmd: Command) -> Result<NsChild> {
        let args: Vec<&OsStr> = cmd.get_args().take(3).collect();
        let expected: [&OsStr; 3] = ["netns".as_ref(), "exec".as_ref(), self.name.as_ref()];
        if cmd.get_program() != "ip" || args != expected {
            bail!(
                "Netns::spawn({}): the command must come from Netns::cmd (ip netns exec {} …), \
                 got {cmd:?}",
                self.name,
                self.name
            );
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {cmd:?} in {}", self.name))?;
        let shared = Arc::new(Mutex::new(SharedChild::new(child)));
        let mut registry = self.children.lock().unwrap_or_else(|e| e.into_inner());
        registry.retain(|w| w.strong_count() > 0);
        registry.push(Arc::downgrade(&shared));
        Ok(NsChild::new(shared, self.name.clone()))
    }

    /// Kills (process group, SIGKILL) and reaps every child spawned through
    /// [`Netns::spawn`] that is still running.
    pub fn kill_children(&self) {
        let children: Vec<_> = {
            let mut registry = self.children.lock().unwrap_or_else(|e| e.into_inner());
            registry.drain(..).filter_map(|w| w.upgrade()).collect()
        };
        for child in children {
            child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .kill_and_reap();
        }
    }

    /// A UDP socket of this namespace bound to `bind`, whose reads give up after
    /// `read_timeout`.
    pub fn udp_socket(
        &self,
        bind: std::net::SocketAddr,
        read_timeout: std::time::Duration,
    ) -> Result<std::net::UdpSocket> {
        let socket = self.run_in(move || std::net::UdpSocket::bind(bind))??;
        socket.set_read_timeout(Some(read_timeout))?;
        Ok(socket)
    }

    /// Runs `f` on a new OS thread that first entered this namespace
    /// (`setns(CLONE_NEWNET)`), and returns its result. Sockets created by `f` belong to
    /// the namespace for their whole life, whichever thread uses them later. A panic in
    /// `f` is resumed in the caller.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let ns = self.open()?;
        let name = self.name.clone();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("ns:{}", self.name))
                .spawn_scoped(scope, move || -> Result<R> {
                    enter(&ns, &name)?;
                    drop(ns);
                    Ok(f())
                })
                .context("spawning a namespace thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run_in`] but does not wait: returns once the new thread has
    /// entered the namespace (so a `setns` failure is reported here).
    pub fn spawn_thread<F, R>(&self, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let ns = self.open()?;
        let name = self.name.clone();
        let (entered_tx, entered_rx) = mpsc::sync_channel::<Result<()>>(1);
        let handle = std::thread::Builder::new()
            .name(format!("ns:{}", self.name))
            .spawn(move || {
                let entered = enter(&ns, &name);
                drop(ns);
                let ok = entered.is_ok();
                // The receiver waits for this message; it cannot be gone yet.
                let _ = entered_tx.send(entered);
                if !ok {
                    // Never run `f` outside the namespace. The caller already got the
                    // error and dropped the handle.
                    panic!("could not enter network namespace {name}");
                }
                f()
            })
            .context("spawning a namespace thread")?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(anyhow!(
                "namespace thread for {} died before setns",
                self.name
            )),
        }
    }

    /// Runs `fut` to completion on a tokio current-thread runtime (I/O and time
    /// enabled) in a thread inside this namespace; sockets the future creates live in
    /// the namespace.
    pub fn block_on<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.run_in(move || {
            let rt = runtime()?;
            Ok(rt.block_on(fut))
        })?
    }

    /// Starts `fut` on a tokio current-thread runtime in a background thread inside
    /// this namespace. The returned [`NsTask`] cancels the future and joins the thread
    /// when dropped; [`NsTask::join`] waits for its output instead.
    pub fn spawn_async<F>(&self, fut: F) -> Result<NsTask<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = self.spawn_thread(move || -> Result<Option<F::Output>> {
            let rt = runtime()?;
            Ok(rt.block_on(async move {
                tokio::select! {
                    out = fut => Some(out),
                    _ = cancel_rx => None,
                }
            }))
        })?;
        Ok(NsTask {
            cancel: Some(cancel_tx),
            handle: Some(handle),
            ns: self.name.clone(),
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio current-thread runtime")
}

/// Moves the calling thread into the namespace behind `ns`.
fn enter(ns: &File, name: &str) -> Result<()> {
    // SAFETY: plain syscall on a valid, open namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns(CLONE_NEWNET) into {name}"));
    }
    Ok(())
}

/// A future running on its own runtime in a namespace thread
/// ([`Netns::spawn_async`]). Dropping it cancels the future and joins the thread.
#[derive(Debug)]
pub struct NsTask<T> {
    cancel: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<Option<T>>>>,
    ns: String,
}

impl<T> NsTask<T> {
    /// Whether the future has completed (or the thread has ended).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the future's output. A panic inside it is resumed here.
    pub fn join(mut self) -> Result<T> {
        let handle = self.handle.take().context("task already joined")?;
        match handle.join() {
            Ok(Ok(Some(out))) => Ok(out),
            Ok(Ok(None)) => Err(anyhow!("task in {} was cancelled", self.ns)),
            Ok(Err(e)) => Err(e),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Cancels the future (drops it at its next await point) and joins the thread.
    /// Returns its output if it had already completed.
    pub fn stop(mut self) -> Result<Option<T>> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<Option<T>> {
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(());
        }
        let Some(handle) = self.handle.take() else {
            return Ok(None);
        };
        match handle.join() {
            Ok(result) => result,
            Err(_) => Err(anyhow!("task in {} panicked", self.ns)),
        }
    }
}

impl<T> Drop for NsTask<T> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner()
            && !std::thread::panicking()
        {
            eprintln!("lab: stopping task: {e:#}");
        }
    }
}
