//! The OCI runtime (crun) command line, as containerd's runc shim builds it:
//! `crun --root <root>/<namespace> --log <bundle>/log.json --log-format json <command>`.
//!
//! The shim reaps every child itself (a SIGCHLD loop in the containerd-shim crate that
//! reports exits by pid), so a command is never waited with `Child::wait`: the exit comes
//! from a monitor subscription taken before the spawn.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use containerd_shim::{
    asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe},
    monitor::{Subject, Topic},
};

/// The runtime root of containerd's runc shim; skiff's node cleanup looks there too.
const RUNTIME_ROOT: &str = "/run/containerd/runc";

/// One container's OCI runtime invocations.
#[derive(Debug, Clone)]
pub struct Oci {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub id: String,
}

/// The container's stdout/stderr for `create` (the init inherits them).
pub struct CreateStdio {
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl Oci {
    pub fn new(binary: Option<&str>, namespace: &str, bundle: &Path, id: &str) -> Oci {
        Oci {
            binary: PathBuf::from(binary.filter(|b| !b.is_empty()).unwrap_or("crun")),
            root: Path::new(RUNTIME_ROOT).join(namespace),
            bundle: bundle.to_path_buf(),
            id: id.to_string(),
        }
    }

    pub fn pid_file(&self) -> PathBuf {
        self.bundle.join("init.pid")
    }

    /// `create --bundle B --pid-file B/init.pid <id>`: the container exists, its init waits
    /// for `start`. Returns the init's pid.
    pub async fn create(&self, stdio: CreateStdio) -> Result<u32, String> {
        let pid_file = self.pid_file();
        let mut cmd = self.command();
        cmd.arg("create")
            .arg("--bundle")
            .arg(&self.bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&self.id);
        cmd.stdout(stdio.stdout.map_or_else(Stdio::null, Stdio::from));
        cmd.stderr(stdio.stderr.map_or_else(Stdio::null, Stdio::from));
        self.run("create", cmd).await?;
        let text = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("reading {}: {e}", pid_file.display()))?;
        text.trim()
            .parse()
            .map_err(|_| format!("{} holds no pid: {text:?}", pid_file.display()))
    }

    pub async fn start(&self) -> Result<(), String> {
        let mut cmd = self.command();
        cmd.arg("start").arg(&self.id);
        self.run("start", cmd).await
    }

    /// Signals every process of the container (`kill --all`).
    pub async fn kill_all(&self, signal: u32) -> Result<(), String> {
        let mut cmd = self.command();
        cmd.args(["kill", "--all"])
            .arg(&self.id)
            .arg(signal.to_string());
        self.run("kill", cmd).await
    }

    /// `delete --force`: kills what is left and removes the container's state and cgroups.
    /// A container the runtime does not know is not an error (already deleted).
    pub async fn delete(&self) -> Result<(), String> {
        if !self.root.join(&self.id).exists() {
            return Ok(());
        }
        let mut cmd = self.command();
        cmd.args(["delete", "--force"]).arg(&self.id);
        self.run("delete", cmd).await
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(self.bundle.join("log.json"))
            .arg("--log-format")
            .arg("json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Runs `cmd` to its end; on failure the error is the runtime's own message (its json
    /// log), prefixed like containerd's: "OCI runtime create failed: ...".
    async fn run(&self, what: &str, mut cmd: Command) -> Result<(), String> {
        let log = self.bundle.join("log.json");
        let _ = std::fs::remove_file(&log);
        let code = run_to_exit(&mut cmd)
            .await
            .map_err(|e| format!("OCI runtime {what} failed: {}: {e}", self.binary.display()))?;
        if code == 0 {
            return Ok(());
        }
        let message = std::fs::read_to_string(&log)
            .ok()
            .and_then(|l| last_error(&l))
            .unwrap_or_else(|| format!("exit status {code}"));
        Err(format!("OCI runtime {what} failed: {message}"))
    }
}

/// Spawns `cmd` and waits for its exit code through the shim's reaper.
pub async fn run_to_exit(cmd: &mut Command) -> std::io::Result<i32> {
    let mut sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let spawned = cmd.spawn();
    // Dropped without waiting: the reaper collects it.
    let result = match spawned {
        Ok(child) => {
            let pid = child.id() as i32;
            drop(child);
            let mut code = None;
            while let Some(ev) = sub.rx.recv().await {
                if matches!(ev.subject, Subject::Pid(p) if p == pid) {
                    code = Some(ev.exit_code);
                    break;
                }
            }
            code.ok_or_else(|| std::io::Error::other("the shim's reaper stopped"))
        }
        Err(e) => Err(e),
    };
    let _ = monitor_unsubscribe(sub.id).await;
    result
}

/// The last `"msg"` of an error line of a crun/runc json log.
fn last_error(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .filter_map(|v| v["msg"].as_str().map(str::to_owned))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_is_the_last_error_line() {
        let log = r#"{"msg": "starting", "level": "info"}
{"msg": "executable file `nope` not found in $PATH: No such file or directory", "level": "error", "time": "2026-11-26T12:00:00Z"}
not json
"#;
        assert_eq!(
            last_error(log).as_deref(),
            Some("executable file `nope` not found in $PATH: No such file or directory")
        );
        assert_eq!(last_error(r#"{"msg": "fine", "level": "info"}"#), None);
    }
}
