//! Reloading the config while serving (SPEC §7): on SIGHUP and when the file
//! changes. The new config is validated first (an invalid one is logged with the
//! same lines as `check-config` and the running config stays), then applied as a
//! difference ([`crate::datapath::Datapath::apply`] writes additions before
//! removals; [`crate::datapath::Plan::rebuild`] keeps every index that still
//! exists, so live flows, counters and TCP listeners carry on).
//!
//! * [`ConfigWatch`]: notices a change of the file by polling once a second
//!   (identity, size, mtime, then a hash of the contents: editors that save by
//!   rename, `cp`, `sed -i`, configuration management all look the same);
//! * [`describe_changes`]: what a reload changes, for the log;
//! * [`end_flows_of`]: the live UDP flows of removed apps end at once, each with
//!   its `disconnect` event (their ports are gone: nothing would reach them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use log::warn;

use crate::config::Config;
use crate::datapath::Datapath;
use crate::telemetry::events::{EventKind, EventLog, status};
use crate::udp_flows::{flow_event, ip_from16, monotonic_ns};

/// How often the config file is looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    })
}

fn content_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// Notices changes of the config file's contents.
#[derive(Debug)]
pub struct ConfigWatch {
    path: PathBuf,
    stamp: Option<Stamp>,
    hash: Option<u64>,
}

impl ConfigWatch {
    /// Starts from the file as it is now (the config just loaded).
    pub fn new(path: &Path) -> ConfigWatch {
        let mut watch = ConfigWatch {
            path: path.to_path_buf(),
            stamp: None,
            hash: None,
        };
        watch.mark_current();
        watch
    }

    /// Records the file as it is now as seen (after a reload for another reason).
    pub fn mark_current(&mut self) {
        self.stamp = stamp(&self.path);
        self.hash = content_hash(&self.path);
    }

    /// Whether the contents changed since the last call (or `mark_current`). A file
    /// that is missing or unreadable is not a change: the next version that can be
    /// read is. Each version is reported once, valid or not.
    pub fn changed(&mut self) -> bool {
        let now = stamp(&self.path);
        if now.is_none() || now == self.stamp {
            return false;
        }
        let Some(hash) = content_hash(&self.path) else {
            return false;
        };
        self.stamp = now;
        if Some(hash) == self.hash {
            return false;
        }
        self.hash = Some(hash);
        true
    }
}

/// One line per kind of change between two configs, for the log: apps added,
/// removed and changed (by id), and the other sections that differ.
pub fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let old_apps: BTreeMap<&str, _> = old.apps.iter().map(|a| (a.id.as_str(), a)).collect();
    let new_apps: BTreeMap<&str, _> = new.apps.iter().map(|a| (a.id.as_str(), a)).collect();
    let added: Vec<&str> = new_apps
        .keys()
        .filter(|id| !old_apps.contains_key(*id))
        .copied()
        .collect();
    let removed: Vec<&str> = old_apps
        .keys()
        .filter(|id| !new_apps.contains_key(*id))
        .copied()
        .collect();
    let changed: Vec<&str> = new_apps
        .iter()
        .filter(|(id, app)| old_apps.get(*id).is_some_and(|old| old != *app))
        .map(|(id, _)| *id)
        .collect();
    let mut lines = Vec::new();
    for (what, ids) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !ids.is_empty() {
            lines.push(format!("apps {what}: {}", ids.join(", ")));
        }
    }
    if old.access_rules != new.access_rules {
        lines.push(format!(
            "access rules changed ({} -> {})",
            old.access_rules.len(),
            new.access_rules.len()
        ));
    }
    if old.firewall != new.firewall {
        lines.push(format!(
            "firewall default {} -> {}",
            old.firewall.default, new.firewall.default
        ));
    }
    if old.agent != new.agent {
        lines.push("[agent] changed".to_string());
    }
    lines
}

/// Settings that only a restart applies; the reload goes on with the rest.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.agent.metrics_listen != new.agent.metrics_listen {
        keys.push("agent.metrics_listen");
    }
    if old.agent.event_log != new.agent.event_log {
        keys.push("agent.event_log");
    }
    // The engine is chosen at start (with `tcp_splice`, which `auto` gives way to).
    let ring = |c: &Config| c.agent.tcp_engine.tries_io_uring(c.agent.tcp_splice);
    if ring(old) != ring(new) {
        keys.push("agent.tcp_engine");
    }
    keys
}

/// Ends every live UDP flow of the apps at `indices` (by app index in the plan that
/// held them, `ids` naming them), with a `disconnect` event each (status 200, the
/// app is gone). Returns how many ended.
pub fn end_flows_of(
    datapath: &mut Datapath,
    indices: &BTreeMap<u32, String>,
    old_config: &Config,
    origins: &[forwarder_common::OriginInfo],
    events: &EventLog,
) -> anyhow::Result<usize> {
    if indices.is_empty() {
        return Ok(0);
    }
    let proxies: HashMap<&str, &str> = old_config
        .apps
        .iter()
        .map(|a| (a.id.as_str(), a.proxy_protocol.as_str()))
        .collect();
    let now_mono = monotonic_ns();
    let now_wall = SystemTime::now();
    let mut ended = 0;
    for (key, state) in datapath.udp_flows()? {
        let Some(app) = indices.get(&state.app) else {
            continue;
        };
        if let Err(err) = datapath.remove_udp_flow(&key, &state) {
            warn!("ending a flow of removed app {app}: {err:#}");
            continue;
        }
        ended += 1;
        events.emit(&flow_event(
            EventKind::Disconnect,
            status::NORMAL_CLOSE,
            &key,
            &state,
            app,
            proxies.get(app.as_str()).unwrap_or(&""),
            origins
                .get(state.origin as usize)
                .map(|o| ip_from16(o.addr)),
            now_mono,
            now_wall,
        ));
    }
    Ok(ended)
}

/// The app indices of `old` whose id is not in `new` (removed apps).
pub fn removed_app_indices(
    old: &BTreeMap<String, u32>,
    new: &BTreeMap<String, u32>,
) -> BTreeMap<u32, String> {
    let keep: BTreeSet<&String> = new.keys().collect();
    old.iter()
        .filter(|(id, _)| !keep.contains(id))
        .map(|(id, i)| (*i, id.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[agent]\ninterfaces = [\"eth0\"]\n";

    fn app(id: &str, port: u16, origin: &str) -> String {
        format!(
            "[[apps]]\nid = \"{id}\"\nprotocol = \"udp/{port}\"\norigin_direct = [\"udp://{origin}:{port}\"]\n"
        )
    }

    #[test]
    fn describes_added_removed_and_changed_apps() {
        let old = Config::parse(&format!(
            "{BASE}{}{}",
            app("a", 1000, "10.0.0.1"),
            app("b", 1001, "10.0.0.1")
        ))
        .unwrap();
        let new = Config::parse(&format!(
            "{BASE}metrics_listen = \"127.0.0.1:9477\"\n{}{}",
            app("b", 1001, "10.0.0.2"),
            app("c", 1002, "10.0.0.1")
        ))
        .unwrap();
        assert_eq!(
            describe_changes(&old, &new),
            [
                "apps added: c",
                "apps removed: a",
                "apps changed: b",
                "[agent] changed"
            ]
        );
        assert_eq!(restart_only_changes(&old, &new), ["agent.metrics_listen"]);
        let engine = Config::parse(&format!(
            "{BASE}metrics_listen = \"127.0.0.1:9477\"\ntcp_engine = \"epoll\"\n{}{}",
            app("b", 1001, "10.0.0.2"),
            app("c", 1002, "10.0.0.1")
        ))
        .unwrap();
        assert_eq!(restart_only_changes(&new, &engine), ["agent.tcp_engine"]);
        assert!(describe_changes(&old, &old).is_empty());
    }

    #[test]
    fn removed_indices() {
        let old = BTreeMap::from([("a".to_string(), 0), ("b".to_string(), 1)]);
        let new = BTreeMap::from([("b".to_string(), 1), ("c".to_string(), 2)]);
        assert_eq!(
            removed_app_indices(&old, &new),
            BTreeMap::from([(0, "a".to_string())])
        );
    }

    #[test]
    fn watch_reports_each_content_change_once() {
        let dir = std::env::temp_dir().join(format!("fwd-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("forwarder.toml");
        std::fs::write(&path, "one").unwrap();
        let mut watch = ConfigWatch::new(&path);
        assert!(!watch.changed());
        std::fs::write(&path, "two").unwrap();
        assert!(watch.changed());
        assert!(!watch.changed());
        // Same contents written again (touch): not a change.
        std::fs::write(&path, "two").unwrap();
        assert!(!watch.changed());
        // Replaced by rename, as editors save.
        std::fs::write(dir.join("new"), "three").unwrap();
        std::fs::rename(dir.join("new"), &path).unwrap();
        assert!(watch.changed());
        // Gone for a moment: no change; back with other contents: a change.
        std::fs::remove_file(&path).unwrap();
        assert!(!watch.changed());
        std::fs::write(&path, "four").unwrap();
        assert!(watch.changed());
        std::fs::write(&path, "five").unwrap();
        watch.mark_current();
        assert!(!watch.changed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
