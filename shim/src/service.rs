//! The shim daemon: the containers of one pod (one shim per pod, as containerd's CRI
//! plugin groups them), their state, and the task API containerd calls.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim::{
    Config, DeleteResponse, Error, Flags, StartOpts, TtrpcResult,
    api::{
        ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
        Empty, KillRequest, Options, ShutdownRequest, StartRequest, StartResponse, StateRequest,
        StateResponse, Status, WaitRequest, WaitResponse,
    },
    asynchronous::{
        ExitSignal,
        monitor::monitor_subscribe,
        publisher::RemotePublisher,
        spawn,
        util::{mount_rootfs, write_str_to_file},
    },
    monitor::{Subject, Topic},
    protos::{
        protobuf::{Message, well_known_types::timestamp::Timestamp},
        shim_async::Task,
        ttrpc::{self, r#async::TtrpcContext},
    },
    util::timestamp,
};
use tokio::sync::{Mutex, watch};

use crate::{oci::Oci, stdio};

/// The annotation containerd's runc shim groups containers by (one shim per pod).
const GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";
/// The OCI runtime binary, recorded in the bundle at create for `delete`.
const RUNTIME_FILE: &str = "runtime";

pub struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: String,
}

#[async_trait]
impl containerd_shim::asynchronous::Shim for Shim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
        }
    }

    /// `start` (cwd = the bundle): the daemon of the container's pod, started unless it
    /// already runs; its address also goes to `<bundle>/address`.
    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|spec| {
                spec["annotations"][GROUP_ANNOTATION]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// `delete` after the daemon is gone (and, in containerd 1.6, after every task delete):
    /// whatever is left of the container goes.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?
        } else {
            PathBuf::from(&self.bundle)
        };
        let binary = std::fs::read_to_string(bundle.join(RUNTIME_FILE)).ok();
        let oci = Oci::new(binary.as_deref(), &self.namespace, &bundle, &self.id);
        let pid = std::fs::read_to_string(oci.pid_file())
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        if let Err(e) = oci.delete().await {
            log::warn!("{e}");
        }
        unmount_rootfs(&bundle);
        Ok(DeleteResponse {
            pid,
            // SIGKILL, as containerd's runc shim reports a container it cleaned up.
            exit_status: 128 + 9,
            exited_at: Some(timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, _publisher: RemotePublisher) -> Service {
        let service = Service {
            inner: Arc::new(Inner {
                namespace: self.namespace.clone(),
                containers: Mutex::default(),
                exit: self.exit.clone(),
            }),
        };
        service.watch_exits().await;
        service
    }
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    containers: Mutex<Containers>,
    exit: Arc<ExitSignal>,
}

#[derive(Default)]
struct Containers {
    by_id: HashMap<String, Container>,
    /// Exits of children no container claimed yet (an init can exit before its pid is
    /// read from the pid file; crun's own exits land here too): the last few.
    unclaimed: VecDeque<(u32, Exit)>,
}

#[derive(Clone, Copy, Debug)]
struct Exit {
    code: u32,
    at: (i64, i32),
}

struct Container {
    oci: Oci,
    pid: u32,
    started: bool,
    exit: Option<Exit>,
    /// Becomes true at the init's exit (Wait waits on it).
    exited: watch::Sender<bool>,
    stdout: String,
    stderr: String,
    logger_pid: Option<u32>,
}

impl Container {
    fn status(&self) -> Status {
        match (self.exit, self.started) {
            (Some(_), _) => Status::STOPPED,
            (None, true) => Status::RUNNING,
            (None, false) => Status::CREATED,
        }
    }
}

impl Containers {
    fn get(&self, id: &str) -> TtrpcResult<&Container> {
        self.by_id
            .get(id)
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    fn get_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.by_id
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }
}

const UNCLAIMED_KEPT: usize = 256;

fn now() -> (i64, i32) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs() as i64, t.subsec_nanos() as i32)
}

fn ts((seconds, nanos): (i64, i32)) -> Timestamp {
    Timestamp {
        seconds,
        nanos,
        ..Default::default()
    }
}

fn not_found(what: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, what))
}

fn failed(code: ttrpc::Code, what: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, what))
}

impl Service {
    /// Every child exit the reaper reports: a container's init becomes stopped.
    async fn watch_exits(&self) {
        let Ok(mut sub) = monitor_subscribe(Topic::Pid).await else {
            log::error!("cannot watch child exits");
            return;
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                let Subject::Pid(pid) = ev.subject else {
                    continue;
                };
                let exit = Exit {
                    code: ev.exit_code as u32,
                    at: now(),
                };
                let mut cs = inner.containers.lock().await;
                let pid = pid as u32;
                match cs
                    .by_id
                    .values_mut()
                    .find(|c| c.pid == pid && c.exit.is_none())
                {
                    Some(c) => c.set_exit(exit),
                    None => {
                        if cs.unclaimed.len() == UNCLAIMED_KEPT {
                            cs.unclaimed.pop_front();
                        }
                        cs.unclaimed.push_back((pid, exit));
                    }
                }
            }
        });
    }

    async fn create_container(&self, req: &CreateTaskRequest) -> Result<u32, String> {
        let bundle = PathBuf::from(&req.bundle);
        if req.terminal || !req.stdin.is_empty() {
            return Err("this shim runs containers without a terminal or stdin".into());
        }
        let binary = req
            .options
            .as_ref()
            .and_then(|any| Options::parse_from_bytes(&any.value).ok())
            .map(|o| o.binary_name)
            .filter(|b| !b.is_empty());
        let oci = Oci::new(binary.as_deref(), &self.inner.namespace, &bundle, &req.id);
        std::fs::write(
            bundle.join(RUNTIME_FILE),
            oci.binary.as_os_str().as_encoded_bytes(),
        )
        .map_err(|e| format!("writing the bundle: {e}"))?;
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
        for m in &req.rootfs {
            mount_rootfs(m, &rootfs)
                .await
                .map_err(|e| format!("mounting the rootfs: {e}"))?;
        }
        let opened =
            match stdio::open(&req.stdout, &req.stderr, &req.id, &self.inner.namespace).await {
                Ok(o) => o,
                Err(e) => {
                    unmount_rootfs(&bundle);
                    return Err(e);
                }
            };
        let logger_pid = opened.logger_pid;
        let pid = match oci.create(opened.stdio).await {
            Ok(pid) => pid,
            Err(e) => {
                let _ = oci.delete().await;
                unmount_rootfs(&bundle);
                return Err(e);
            }
        };
        let mut cs = self.inner.containers.lock().await;
        let (exited, _) = watch::channel(false);
        let mut c = Container {
            oci,
            pid,
            started: false,
            exit: None,
            exited,
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            logger_pid,
        };
        if let Some(i) = cs.unclaimed.iter().position(|(p, _)| *p == pid) {
            let (_, exit) = cs.unclaimed.remove(i).unwrap_or((
                pid,
                Exit {
                    code: 255,
                    at: now(),
                },
            ));
            c.set_exit(exit);
        }
        cs.by_id.insert(req.id.clone(), c);
        Ok(pid)
    }
}

impl Container {
    fn set_exit(&mut self, exit: Exit) {
        self.exit = Some(exit);
        // send_replace: stored even while no Wait is watching (send would drop it).
        self.exited.send_replace(true);
    }
}

fn unmount_rootfs(bundle: &Path) {
    let rootfs = bundle.join("rootfs");
    // Layers can stack (overlay on a bind): unmount until nothing is mounted there.
    for _ in 0..4 {
        if nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(failed(
                ttrpc::Code::UNIMPLEMENTED,
                "checkpoints are not supported".into(),
            ));
        }
        let pid = self
            .create_container(&req)
            .await
            .map_err(|e| failed(ttrpc::Code::UNKNOWN, e))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let oci = {
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id)?;
            if c.started {
                return Err(failed(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} already started", req.id),
                ));
            }
            c.oci.clone()
        };
        oci.start()
            .await
            .map_err(|e| failed(ttrpc::Code::UNKNOWN, e))?;
        let mut cs = self.inner.containers.lock().await;
        let c = cs.get_mut(&req.id)?;
        c.started = true;
        Ok(StartResponse {
            pid: c.pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(&req.id)?;
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.oci.bundle.display().to_string(),
            pid: c.pid,
            status: c.status().into(),
            stdout: c.stdout.clone(),
            stderr: c.stderr.clone(),
            exit_status: c.exit.map_or(0, |e| e.code),
            exited_at: c.exit.map(|e| ts(e.at)).into(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut exited = {
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id)?;
            c.exited.subscribe()
        };
        let _ = exited.wait_for(|e| *e).await;
        let cs = self.inner.containers.lock().await;
        let exit = cs
            .by_id
            .get(&req.id)
            .and_then(|c| c.exit)
            .ok_or_else(|| not_found(format!("container {} was deleted", req.id)))?;
        Ok(WaitResponse {
            exit_status: exit.code,
            exited_at: Some(ts(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let (oci, pid) = {
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id)?;
            if c.exit.is_some() {
                return Err(not_found("process already finished".into()));
            }
            (c.oci.clone(), c.pid)
        };
        if req.all {
            oci.kill_all(req.signal)
                .await
                .map_err(|e| failed(ttrpc::Code::UNKNOWN, e))?;
        } else {
            // The init is this shim's child until it is reaped, so its pid is not reused.
            let signal = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(|_| {
                failed(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("signal {}", req.signal),
                )
            })?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(
                |e| match e {
                    nix::errno::Errno::ESRCH => not_found("process already finished".into()),
                    e => failed(ttrpc::Code::UNKNOWN, format!("kill {pid}: {e}")),
                },
            )?;
        }
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let oci = {
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id)?;
            if c.status() == Status::RUNNING {
                return Err(failed(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("cannot delete running task {}", req.id),
                ));
            }
            c.oci.clone()
        };
        oci.delete()
            .await
            .map_err(|e| failed(ttrpc::Code::UNKNOWN, e))?;
        unmount_rootfs(&oci.bundle);
        let mut cs = self.inner.containers.lock().await;
        let c = cs
            .by_id
            .remove(&req.id)
            .ok_or_else(|| not_found(format!("container {} not found", req.id)))?;
        if let Some(logger) = c.logger_pid {
            stop_logger_later(logger);
        }
        let exit = c.exit.unwrap_or(Exit {
            code: 128 + 9,
            at: now(),
        });
        Ok(DeleteResponse {
            pid: c.pid,
            exit_status: exit.code,
            exited_at: Some(ts(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let cs = self.inner.containers.lock().await;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: cs.by_id.get(&req.id).map_or(0, |c| c.pid),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.inner.containers.lock().await.by_id.is_empty() {
            self.inner.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// The logger exits by itself at EOF, once the container's last process is gone; one
/// that is still there 12 s after the delete (containerd's grace) is killed.
fn stop_logger_later(pid: u32) {
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(12)).await;
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ").and_then(|(_, rest)| {
                    rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok())
                })
            });
        if ppid == Some(std::process::id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
}
