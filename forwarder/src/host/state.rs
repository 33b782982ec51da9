//! What the agent changed on the host, kept where the next agent finds it.
//!
//! The state directory (`--state-dir`, default [`DEFAULT_STATE_DIR`]) holds two
//! files:
//!
//! * [`LOCK_FILE`]: the single-instance guard. The running agent holds an
//!   exclusive `flock` on it (and wrote its pid into it). A second agent with the
//!   same state directory finds the lock taken and exits before it touches
//!   anything; the kernel releases the lock when the holder's process ends, however
//!   it ends, so a crashed agent never blocks the next one.
//!   An agent whose control socket answers already (another agent with another
//!   state directory) is refused the same way.
//! * [`JOURNAL_FILE`]: the journal, JSON, rewritten atomically (temporary file,
//!   `fsync`, `rename`, `fsync` of the directory) **before** each change it
//!   describes: every sysctl the agent changed with the value it had before the
//!   agent's first change, every neighbour entry the agent manages and whether it
//!   existed before, the control socket path. A clean exit (and a start that fails
//!   half way, and dropping a [`HostState`] on any error path) puts all of it back
//!   and deletes the journal. After a crash or `SIGKILL` the journal stays; the
//!   next start (lock free, journal present) repairs what it lists first, with a
//!   log line per repair, then goes on. Since a repair writes back the *original*
//!   values, a crash-and-restart cycle never turns the agent's own values into
//!   "originals".
//!
//! Only what the agent changed is put back, and only while it still holds the
//! agent's value: a sysctl or neighbour entry that someone else changed since is
//! left as it is (and logged).

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::route::Neighbour;

/// Where `run` keeps its lock and journal unless told otherwise (`--state-dir`).
/// The systemd unit's `RuntimeDirectory`; a reboot empties it, as it resets what
/// the journal describes.
pub const DEFAULT_STATE_DIR: &str = "/run/forwarder";
/// The single-instance lock (holds the running agent's pid).
pub const LOCK_FILE: &str = "agent.lock";
/// The journal of host changes.
pub const JOURNAL_FILE: &str = "host-state.json";
/// The format of the journal; another version is refused, not guessed at.
const JOURNAL_VERSION: u32 = 1;

/// A sysctl the agent changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SysctlRecord {
    /// Under `/proc/sys`.
    pub path: String,
    /// The value before the agent's first change (what is put back).
    pub original: String,
    /// The value the agent wrote (put back only while it still holds this).
    pub set: String,
}

/// A neighbour entry the agent manages (keeps resolved with `NTF_EXT_MANAGED`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NeighbourRecord {
    pub addr: IpAddr,
    pub dev: String,
    /// The agent created the entry: it is deleted on exit. Otherwise the entry was
    /// a learned (dynamic) one before: it is put back as a learned entry.
    pub created: bool,
    /// The link-layer address the entry had before, if any (`aa:bb:…`).
    #[serde(default)]
    pub lladdr: Option<String>,
}

impl NeighbourRecord {
    pub fn is(&self, neighbour: &Neighbour) -> bool {
        self.addr == neighbour.addr && self.dev == neighbour.dev
    }

    pub fn neighbour(&self) -> Neighbour {
        Neighbour {
            addr: self.addr,
            dev: self.dev.clone(),
        }
    }
}

/// The journal's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Journal {
    pub version: u32,
    /// The agent that wrote it (for the log of a repair).
    pub pid: u32,
    /// The control socket the agent binds (a crashed agent leaves the file).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    #[serde(default)]
    pub sysctls: Vec<SysctlRecord>,
    #[serde(default)]
    pub neighbours: Vec<NeighbourRecord>,
}

impl Journal {
    fn new() -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            pid: std::process::id(),
            control_socket: None,
            sysctls: Vec::new(),
            neighbours: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.control_socket.is_none() && self.sysctls.is_empty() && self.neighbours.is_empty()
    }
}

/// The running agent's hold on the host: the single-instance lock and the journal
/// of what it changed. Dropping it puts everything back (see the module docs);
/// [`HostState::restore`] does so explicitly.
pub struct HostState {
    dir: PathBuf,
    /// Holds the `flock` for as long as the agent lives.
    _lock: File,
    journal: Journal,
    /// Neighbours whose entries existed before the agent and are left alone
    /// (permanent, no-ARP or managed by someone else), each logged once.
    pub(crate) left_alone: Vec<Neighbour>,
    /// Everything was put back: nothing for `Drop` to do.
    restored: bool,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("dir", &self.dir)
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

impl HostState {
    /// Takes the single-instance lock in `dir` (created if missing), then repairs
    /// what a dead agent's journal lists, then journals `control_socket` (bound
    /// next). Fails without changing anything on the host when another agent holds
    /// the lock.
    pub fn acquire(dir: &Path, control_socket: Option<&Path>) -> anyhow::Result<HostState> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&lock_path)
            .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
        // SAFETY: flock on an open fd owned by `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let holder = lock
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok())
                    .map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"));
                bail!(
                    "another forwarder agent is running ({holder}): it holds {}. One agent \
                     per state directory (--state-dir); this one exits without changing \
                     anything",
                    lock_path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", lock_path.display()));
        }
        lock.set_len(0)
            .and_then(|()| lock.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .and_then(|()| lock.sync_all())
            .with_context(|| format!("writing the pid into {}", lock_path.display()))?;
        // An agent with another state directory serving the same control socket
        // (and so, most likely, the same host): leave both alone.
        if let Some(path) = control_socket
            && std::os::unix::net::UnixStream::connect(path).is_ok()
        {
            bail!(
                "another forwarder agent is serving {} (with another --state-dir?); this \
                 one exits without changing anything",
                path.display()
            );
        }
        // A temporary journal of a write that never got renamed: not the journal.
        let _ = std::fs::remove_file(dir.join(temporary_name()));

        let mut state = HostState {
            dir: dir.to_path_buf(),
            _lock: lock,
            journal: Journal::new(),
            left_alone: Vec::new(),
            restored: false,
        };
        if let Some(dead) = state.read_journal()? {
            info!(
                "repairing what the previous agent (pid {}) left on the host, as recorded in {}",
                dead.pid,
                state.journal_path().display()
            );
            // What cannot be put back now stays in the journal with its original
            // value, so that it is not mistaken for an original later.
            let left = restore_all(&dead, "repair");
            state.journal.sysctls = left.sysctls;
            state.journal.neighbours = left.neighbours;
            if state.journal.sysctls.is_empty() && state.journal.neighbours.is_empty() {
                info!("repair complete");
            } else {
                warn!(
                    "repair incomplete: {} sysctl(s) and {} neighbour entr(ies) stay in {} \
                     and are put back when this agent exits",
                    state.journal.sysctls.len(),
                    state.journal.neighbours.len(),
                    state.journal_path().display()
                );
            }
        }
        state.journal.control_socket = control_socket.map(Path::to_path_buf);
        state.save()?;
        Ok(state)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    pub(crate) fn journal_mut(&mut self) -> &mut Journal {
        &mut self.journal
    }

    /// The journal a previous agent left, if any.
    fn read_journal(&self) -> anyhow::Result<Option<Journal>> {
        let path = self.journal_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| format!("reading the journal {}", path.display()));
            }
        };
        let journal = parse_journal(&text).with_context(|| {
            format!(
                "the journal {} of a previous agent cannot be read, so what it changed \
                 cannot be put back automatically; put back what it lists by hand, then \
                 remove it",
                path.display()
            )
        })?;
        Ok(Some(journal))
    }

    /// Writes the journal as it is now (atomically); removes the file when it
    /// records nothing. Called before each change it describes.
    pub(crate) fn save(&self) -> anyhow::Result<()> {
        let path = self.journal_path();
        if self.journal.is_empty() {
            return remove_durably(&path);
        }
        let text = serde_json::to_string_pretty(&self.journal).context("encoding the journal")?;
        write_atomically(&self.dir, JOURNAL_FILE, text.as_bytes())
            .with_context(|| format!("writing the journal {}", path.display()))
    }

    /// Puts back everything the journal lists and deletes it. What cannot be put
    /// back (logged) stays in the journal for the next start to try again.
    pub fn restore(&mut self) {
        if self.restored {
            return;
        }
        let left = restore_all(&self.journal, "exit");
        let complete = left.sysctls.is_empty() && left.neighbours.is_empty();
        self.journal.sysctls = left.sysctls;
        self.journal.neighbours = left.neighbours;
        self.journal.control_socket = None;
        if let Err(err) = self.save() {
            warn!("{err:#}");
        }
        if complete {
            self.restored = true;
        } else {
            warn!(
                "not everything could be put back; the next start tries again from {}",
                self.journal_path().display()
            );
        }
    }
}

#[cfg(test)]
impl HostState {
    /// What a `SIGKILL` leaves: the journal as it is, the lock released.
    pub(crate) fn abandon(mut self) {
        self.restored = true;
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        // Every exit path that unwinds or returns an error: put the host back
        // before the lock goes.
        self.restore();
    }
}

/// Puts back what `journal` lists (neighbours, then sysctls, then the control
/// socket file); returns what could not be put back. `when` prefixes the log lines
/// ("exit" or "repair").
fn restore_all(journal: &Journal, when: &str) -> Journal {
    let mut left = Journal::new();
    for record in &journal.neighbours {
        match super::neighbour::restore_neighbour(record) {
            Ok(done) => {
                if when == "exit" && record.created {
                    log::debug!("{when}: {done}");
                } else {
                    info!("{when}: {done}");
                }
            }
            Err(err) => {
                warn!(
                    "{when}: putting back the neighbour entry for {} on {} failed: {err:#}",
                    record.addr, record.dev
                );
                left.neighbours.push(record.clone());
            }
        }
    }
    // The latest record of a path last (there is one per path; be safe).
    for record in journal.sysctls.iter().rev() {
        match super::sysctl::restore_sysctl(record) {
            Ok(done) => info!("{when}: {done}"),
            Err(err) => {
                warn!("{when}: restoring {} failed: {err:#}", record.path);
                left.sysctls.insert(0, record.clone());
            }
        }
    }
    if let Some(path) = &journal.control_socket {
        match remove_stale_socket(path) {
            Ok(Some(done)) => info!("{when}: {done}"),
            Ok(None) => {}
            Err(err) => warn!("{when}: {err:#}"),
        }
    }
    left
}

/// Removes the socket file `path` unless something answers on it.
fn remove_stale_socket(path: &Path) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    if !meta.file_type().is_socket() {
        return Ok(Some(format!(
            "{} is not a socket; left as it is",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Ok(Some(format!(
            "{} is served by another process; left as it is",
            path.display()
        )));
    }
    std::fs::remove_file(path)
        .with_context(|| format!("removing the stale control socket {}", path.display()))?;
    Ok(Some(format!(
        "removed the stale control socket {}",
        path.display()
    )))
}

fn parse_journal(text: &str) -> anyhow::Result<Journal> {
    let journal: Journal = serde_json::from_str(text).context("not a journal")?;
    if journal.version != JOURNAL_VERSION {
        bail!(
            "journal version {} (this agent writes version {JOURNAL_VERSION})",
            journal.version
        );
    }
    Ok(journal)
}

fn temporary_name() -> String {
    format!("{JOURNAL_FILE}.tmp")
}

/// `dir/name` := `bytes`, all or nothing, on disk before it returns.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let temporary = dir.join(temporary_name());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn remove_durably(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| format!("syncing {}", dir.display()))?;
            }
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("fwd-host-state-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temporary directory");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("readable")
    }

    /// A file standing in for a sysctl.
    fn fake_sysctl(dir: &Path, name: &str, value: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("{value}\n")).expect("fake sysctl");
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn one_agent_per_state_directory() {
        let tmp = TempDir::new("lock");
        let state = tmp.0.join("state");
        let first = HostState::acquire(&state, None).expect("the first agent");
        assert_eq!(
            read(&state.join(LOCK_FILE)),
            format!("{}\n", std::process::id())
        );
        // flock belongs to the open file: a second open conflicts even in the
        // same process.
        let err = HostState::acquire(&state, None).expect_err("the second agent");
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!(
                "another forwarder agent is running (pid {})",
                std::process::id()
            )),
            "{text}"
        );
        drop(first);
        let again = HostState::acquire(&state, None).expect("free again after the first left");
        drop(again);
        assert!(
            !state.join(JOURNAL_FILE).exists(),
            "nothing recorded, no journal"
        );
    }

    #[test]
    fn a_live_control_socket_of_another_agent_is_refused_first() {
        let tmp = TempDir::new("live-socket");
        let socket = tmp.0.join("control.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("socket");
        let err = HostState::acquire(&tmp.0.join("state"), Some(&socket)).expect_err("refused");
        assert!(
            format!("{err:#}").contains("another forwarder agent is serving"),
            "{err:#}"
        );
        assert!(socket.exists(), "the live socket is left alone");
        assert!(!tmp.0.join("state").join(JOURNAL_FILE).exists());
    }

    #[test]
    fn journals_before_changing_and_restores_on_drop() {
        let tmp = TempDir::new("journal");
        let state_dir = tmp.0.join("state");
        let sysctl = fake_sysctl(&tmp.0, "somaxconn", "4096");
        let socket = tmp.0.join("control.sock");
        let mut state = HostState::acquire(&state_dir, Some(&socket)).expect("lock");
        let journal: Journal = serde_json::from_str(&read(&state.journal_path())).expect("journal");
        assert_eq!(journal.control_socket.as_deref(), Some(socket.as_path()));

        assert_eq!(
            state.set_sysctl(&sysctl, "65535").expect("set"),
            Some("4096".to_string())
        );
        assert_eq!(read(Path::new(&sysctl)).trim(), "65535");
        // A second change keeps the first original.
        assert_eq!(
            state.set_sysctl(&sysctl, "70000").expect("set"),
            Some("65535".to_string())
        );
        assert_eq!(state.set_sysctl(&sysctl, "70000").expect("unchanged"), None);
        let journal: Journal = serde_json::from_str(&read(&state.journal_path())).expect("journal");
        assert_eq!(
            journal.sysctls,
            [SysctlRecord {
                path: sysctl.clone(),
                original: "4096".into(),
                set: "70000".into()
            }]
        );
        drop(state);
        assert_eq!(read(Path::new(&sysctl)).trim(), "4096");
        assert!(!state_dir.join(JOURNAL_FILE).exists());
    }

    #[test]
    fn a_dead_agents_journal_is_repaired_with_the_original_values() {
        let tmp = TempDir::new("repair");
        let state_dir = tmp.0.join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let changed = fake_sysctl(&tmp.0, "forwarding", "1");
        let changed_since = fake_sysctl(&tmp.0, "syncookies", "2");
        let gone = tmp.0.join("no-such-dir/forwarding");
        // A socket nobody serves any more (its listener is closed).
        let socket = tmp.0.join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("socket"));
        let dead = Journal {
            version: JOURNAL_VERSION,
            pid: 999_999,
            control_socket: Some(socket.clone()),
            sysctls: vec![
                SysctlRecord {
                    path: changed.clone(),
                    original: "0".into(),
                    set: "1".into(),
                },
                SysctlRecord {
                    path: changed_since.clone(),
                    original: "0".into(),
                    set: "1".into(),
                },
                SysctlRecord {
                    path: gone.to_string_lossy().into_owned(),
                    original: "0".into(),
                    set: "1".into(),
                },
            ],
            neighbours: Vec::new(),
        };
        std::fs::write(
            state_dir.join(JOURNAL_FILE),
            serde_json::to_string(&dead).expect("json"),
        )
        .expect("journal");

        let mut state = HostState::acquire(&state_dir, None).expect("repairs and starts");
        assert_eq!(read(Path::new(&changed)).trim(), "0", "the original value");
        assert_eq!(
            read(Path::new(&changed_since)).trim(),
            "2",
            "changed by someone else since: left as it is"
        );
        assert!(!socket.exists(), "the stale control socket is removed");
        assert!(!state_dir.join(JOURNAL_FILE).exists());

        // Crash and restart once more: the new agent's originals are the real ones.
        assert_eq!(
            state.set_sysctl(&changed, "1").expect("set"),
            Some("0".into())
        );
        let journal = read(&state.journal_path());
        assert!(journal.contains("\"original\": \"0\""), "{journal}");
        state.abandon(); // a SIGKILL: nothing put back, the lock released
        assert_eq!(read(Path::new(&changed)).trim(), "1");
        let state = HostState::acquire(&state_dir, None).expect("repairs again");
        assert_eq!(read(Path::new(&changed)).trim(), "0");
        drop(state);
    }

    #[test]
    fn an_unreadable_journal_is_refused_naming_it() {
        let tmp = TempDir::new("corrupt");
        let state_dir = tmp.0.join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        std::fs::write(state_dir.join(JOURNAL_FILE), "{\"version\": 1, \"pid\":").expect("w");
        let err = HostState::acquire(&state_dir, None).expect_err("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("host-state.json of a previous agent cannot be read"),
            "{text}"
        );
        std::fs::write(state_dir.join(JOURNAL_FILE), "{\"version\": 7, \"pid\": 1}").expect("w");
        let err = HostState::acquire(&state_dir, None).expect_err("refused");
        assert!(format!("{err:#}").contains("journal version 7"), "{err:#}");
    }
}
