//! The agent's control socket: a Unix stream socket on which `forwarder stats`
//! asks for a snapshot of the counters. One request line, one JSON reply, close.
//!
//! Bounded: a request is one line of at most `MAX_REQUEST` bytes, read within
//! `REQUEST_TIMEOUT`; anything else gets an `{"error": …}` reply. The socket file is
//! mode 0660 whatever the umask (owner and group may ask; others may not).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use log::{debug, warn};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::telemetry::snapshot::StatsSnapshot;

/// Where `run` listens and `stats` connects unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/forwarder/control.sock";

/// Longest request line accepted (with its newline).
pub const MAX_REQUEST: u64 = 256;
/// Time a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Mode of the socket file.
pub const SOCKET_MODE: u32 = 0o660;

/// Produces a snapshot on request (the agent's counters, summed at call time).
pub type SnapshotFn = Arc<dyn Fn() -> anyhow::Result<StatsSnapshot> + Send + Sync>;

/// Drains (`true`) or enables an origin of an app: `forwarder drain` / `enable`.
pub type DrainFn = Arc<dyn Fn(&str, &str, bool) -> anyhow::Result<()> + Send + Sync>;

/// What the control socket answers with.
#[derive(Clone)]
pub struct Handlers {
    pub snapshot: SnapshotFn,
    pub set_drained: DrainFn,
}

/// Listens on `path` until the returned guard is dropped (which removes the file).
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    pub fn bind(path: &Path, handlers: Handlers) -> anyhow::Result<ControlSocket> {
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
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let handlers = handlers.clone();
                        tokio::spawn(async move {
                            if let Err(err) = serve(stream, handlers).await {
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

async fn serve(stream: UnixStream, handlers: Handlers) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let (mut read_half, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new((&mut read_half).take(MAX_REQUEST)).read_line(&mut line),
    )
    .await;
    let error = |text: String| serde_json::json!({ "error": text }).to_string();
    let reply = match read {
        Err(_) => error(format!(
            "no request line within {}s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Err(err)) => error(format!("reading the request: {err}")),
        Ok(Ok(_)) if !line.ends_with('\n') => error(format!(
            "the request must be one line of at most {MAX_REQUEST} bytes"
        )),
        Ok(Ok(_)) => {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                // Both are asked of the agent thread: waited for off the async
                // workers.
                ["stats"] => {
                    let snapshot = handlers.snapshot.clone();
                    match tokio::task::spawn_blocking(move || snapshot()).await {
                        Ok(Ok(s)) => serde_json::to_string(&s)?,
                        Ok(Err(err)) => error(format!("{err:#}")),
                        Err(err) => error(format!("taking the snapshot: {err}")),
                    }
                }
                [verb @ ("drain" | "enable"), app, origin] => {
                    let drained = verb == "drain";
                    let set = handlers.set_drained.clone();
                    let (app, origin) = (app.to_string(), origin.to_string());
                    match tokio::task::spawn_blocking(move || set(&app, &origin, drained)).await {
                        Ok(Ok(())) => serde_json::json!({ "ok": true }).to_string(),
                        Ok(Err(err)) => error(format!("{err:#}")),
                        Err(err) => error(format!("{verb}: {err}")),
                    }
                }
                _ => error(format!(
                    "unknown request {:?}",
                    line.trim().escape_debug().to_string()
                )),
            }
        }
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await?;
    // What an over-long request left unread would turn the close into a reset that
    // loses the reply: discard a bounded amount first (64 KiB, 100 ms).
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match read_half.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// Client side: sends one request line, returns the reply line (an
/// `{"error"}` reply becomes an error).
fn request(path: &Path, line: &str) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the agent at {} (is `forwarder run` running? see --control)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&reply)
        && let Some(error) = map.get("error").and_then(|e| e.as_str())
    {
        bail!("the agent refused the request: {error}");
    }
    Ok(reply)
}

/// `stats`: the snapshot.
pub fn request_stats(path: &Path) -> anyhow::Result<StatsSnapshot> {
    let reply = request(path, "stats")?;
    serde_json::from_str(&reply).context("parsing the agent's reply")
}

/// `forwarder drain` (`drained`) / `enable`.
pub fn request_drain(path: &Path, app: &str, origin: &str, drained: bool) -> anyhow::Result<()> {
    let verb = if drained { "drain" } else { "enable" };
    for word in [app, origin] {
        if word.is_empty() || word.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("{word:?} cannot be sent: app ids and origins are one word here");
        }
    }
    request(path, &format!("{verb} {app} {origin}")).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    async fn ask(path: &Path, request: &[u8]) -> serde_json::Value {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    #[tokio::test]
    async fn requests_are_bounded_and_bad_ones_get_an_error_reply() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("fwd-control-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let socket = ControlSocket::bind(
            &path,
            Handlers {
                snapshot: Arc::new(|| Ok(StatsSnapshot::default())),
                set_drained: Arc::new(|app, origin, drained| {
                    if app == "a" && origin == "10.0.0.1:22" {
                        Ok(())
                    } else {
                        anyhow::bail!("no origin {origin} of {app} to drain ({drained})")
                    }
                }),
            },
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE, "mode 0660 whatever the umask");

        let ok = ask(&path, b"stats\n").await;
        assert!(ok.get("drops").is_some(), "a snapshot: {ok}");
        assert_eq!(ask(&path, b"drain a 10.0.0.1:22\n").await["ok"], true);
        let refused = ask(&path, b"enable b 10.0.0.9:22\n").await;
        assert_eq!(
            refused["error"],
            "no origin 10.0.0.9:22 of b to drain (false)"
        );
        let unknown = ask(&path, b"shutdown\n").await;
        assert_eq!(unknown["error"], "unknown request \"shutdown\"");
        let long = vec![b'x'; 1000];
        let too_long = ask(&path, &long).await;
        assert!(
            too_long["error"]
                .as_str()
                .unwrap()
                .contains("at most 256 bytes"),
            "{too_long}"
        );
        drop(socket);
        assert!(!path.exists(), "the socket file goes with the agent");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
