//! The agent's control socket: a Unix stream socket on which `forwarder stats`
//! asks for a snapshot of the counters. One request line, one JSON reply, close.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use log::{debug, warn};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::stats::StatsSnapshot;

/// Where `run` listens and `stats` connects unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/forwarder/control.sock";

/// Produces a snapshot on request (the agent's counters, summed at call time).
pub type SnapshotFn = Arc<dyn Fn() -> anyhow::Result<StatsSnapshot> + Send + Sync>;

/// Listens on `path` until the returned guard is dropped (which removes the file).
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    pub fn bind(path: &Path, snapshot: SnapshotFn) -> anyhow::Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A socket file left by a crashed agent: replace it only if nobody answers.
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another agent is already serving {}", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let snapshot = snapshot.clone();
                        tokio::spawn(async move {
                            if let Err(err) = serve(stream, snapshot).await {
                                debug!("control request failed: {err:#}");
                            }
                        });
                    }
                    Err(err) => {
                        warn!("control socket accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(ControlSocket {
            path: path.to_path_buf(),
            task,
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(stream: UnixStream, snapshot: SnapshotFn) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await
    .context("request timed out")??;
    let reply = match line.trim() {
        "stats" => serde_json::to_string(&snapshot()?)?,
        other => serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await?;
    Ok(())
}

/// Client side: one request, the JSON reply.
pub fn request_stats(path: &Path) -> anyhow::Result<StatsSnapshot> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the agent at {} (is `forwarder run` running? see --control)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"stats\n")?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).context("parsing the agent's reply")
}
