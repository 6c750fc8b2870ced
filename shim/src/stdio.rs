//! A container's stdout/stderr from the URIs of CreateTaskRequest, as containerd's runc
//! shim reads them:
//! - empty: /dev/null;
//! - `file:///path`: both streams appended to that file;
//! - `binary:///path?k=v`: a logging program (skiff's CRI log copier) started with the
//!   container's stdout and stderr pipes on fds 3 and 4 and a "ready" pipe on fd 5 that it
//!   closes once it is ready; argv are the query's keys and values, env only
//!   CONTAINER_ID and CONTAINER_NAMESPACE. It gets EOF when the container's last process
//!   closes the pipes.
//!
//! - a plain path (containerd's default cio: FIFOs the client reads): opened for writing
//!   and given to the container as they are (no copy in between, unlike the runc shim:
//!   a reader that goes away makes the container's writes fail).

use std::{
    fs::OpenOptions,
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
};

use crate::oci::CreateStdio;

/// The pid of a `binary://` logger, if one was started.
pub struct Opened {
    pub stdio: CreateStdio,
    pub logger_pid: Option<u32>,
}

pub async fn open(
    stdout: &str,
    stderr: &str,
    container_id: &str,
    namespace: &str,
) -> Result<Opened, String> {
    if stdout.is_empty() && stderr.is_empty() {
        return Ok(Opened {
            stdio: CreateStdio {
                stdout: None,
                stderr: None,
            },
            logger_pid: None,
        });
    }
    // skiff gives both streams the same URI (as containerd's cio.LogFile/BinaryIO do).
    let uri = if stdout.is_empty() { stderr } else { stdout };
    if let Some(path) = uri.strip_prefix("file://") {
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| format!("opening the log file {path}: {e}"))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("duplicating the log file {path}: {e}"))?;
        return Ok(Opened {
            stdio: CreateStdio {
                stdout: Some(file.into()),
                stderr: Some(err.into()),
            },
            logger_pid: None,
        });
    }
    if let Some(rest) = uri.strip_prefix("binary://") {
        return start_logger(rest, container_id, namespace).await;
    }
    if uri.contains("://") {
        return Err(format!(
            "stdio {uri:?}: this shim takes file://, binary:// and FIFO paths"
        ));
    }
    Ok(Opened {
        stdio: CreateStdio {
            stdout: open_fifo(stdout).await?,
            stderr: open_fifo(stderr).await?,
        },
        logger_pid: None,
    })
}

/// Opening a FIFO for writing waits for its reader: at most 10 s.
async fn open_fifo(path: &str) -> Result<Option<OwnedFd>, String> {
    if path.is_empty() {
        return Ok(None);
    }
    let owned = path.to_string();
    let open = tokio::task::spawn_blocking(move || OpenOptions::new().write(true).open(owned));
    match tokio::time::timeout(std::time::Duration::from_secs(10), open).await {
        Ok(Ok(Ok(f))) => Ok(Some(f.into())),
        Ok(Ok(Err(e))) => Err(format!("opening {path}: {e}")),
        _ => Err(format!("opening {path}: no reader in 10 s")),
    }
}

async fn start_logger(rest: &str, container_id: &str, namespace: &str) -> Result<Opened, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = &percent_decode(path);
    let mut args = vec![];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(percent_decode(k));
        args.push(percent_decode(v));
    }
    // Close-on-exec: no other child (crun, another container's logger) may inherit them.
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds: [OwnedFd; 3] = [out_r, err_r, ready_w];
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(path);
    cmd.args(&args)
        .env_clear()
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec. The sources
    // are first moved above 10 so that placing one on 3..5 cannot overwrite another;
    // dup2 clears close-on-exec on the targets.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 3];
            for (h, fd) in high.iter_mut().zip(raw.iter()) {
                *h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high.iter()) {
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting the logging binary {path}: {e}"))?;
    let logger_pid = child.id();
    // Our copies go: the logger holds the read ends and the ready pipe's write end.
    drop(child);
    drop(fds);
    // Ready when it closes fd 5 (or exits).
    let ready = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(ready_r);
        let mut b = [0u8; 1];
        let _ = f.read(&mut b);
    });
    if tokio::time::timeout(std::time::Duration::from_secs(10), ready)
        .await
        .is_err()
    {
        return Err(format!(
            "the logging binary {path} did not get ready in 10 s"
        ));
    }
    Ok(Opened {
        stdio: CreateStdio {
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
        logger_pid: Some(logger_pid),
    })
}

/// A URL query part as Go's url.Query reads it ('+' is a space).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("%2Fvar%2Flog%2Fpods"), "/var/log/pods");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
