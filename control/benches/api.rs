//! API benchmark: the same workload against the embedded store and etcd in one run.
//!
//! `cargo bench -p skiff-control --bench api [-- --quick | --objects N | --updates M |
//! --watchers W]` (env: SKIFF_BENCH_QUICK=1, SKIFF_BENCH_OBJECTS, SKIFF_BENCH_UPDATES,
//! SKIFF_BENCH_WATCHERS). Per backend it starts a real `skiff-apiserver` process and
//! measures, over HTTPS on 127.0.0.1:
//! - create: N ConfigMaps, 32 requests in flight;
//! - list: all of them with limit=500 following `continue`, a few rounds;
//! - watch: W watch streams from the list's resourceVersion, then M merge-patches from a
//!   single writer; every watcher must see every update, in order. Updates typed ADDED
//!   instead of MODIFIED are counted and reported rather than fatal, so the numbers stay
//!   available while the registry's watch-from-resourceVersion typing is wrong.
//!
//! Prints a Markdown table (embedded, etcd, embedded÷etcd) and writes target/bench/api.json.
//! Without cargo bench's `--bench` flag (i.e. under `cargo test --bench api`) it runs the
//! quick sizes, so the same binary is a smoke test.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use skiff_control::storage::etcd_process::EtcdProcess;

const NAMESPACE: &str = "skiff-bench";
const CONCURRENCY: usize = 32;
const PAGE_LIMIT: usize = 500;
const LIST_ROUNDS: usize = 3;
/// Bytes of filler per ConfigMap, so objects are not trivially small.
const PAYLOAD_BYTES: usize = 256;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for any one phase; a hang is a failure, not a number.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct Sizes {
    objects: usize,
    updates: usize,
    watchers: usize,
    quick: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench api: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(s) if !s.is_empty() => Ok(Some(
            s.parse()
                .with_context(|| format!("{name}={s:?} is not a count"))?,
        )),
        _ => Ok(None),
    }
}

fn parse_args() -> Result<Sizes> {
    let mut args = std::env::args().skip(1);
    let mut quick = std::env::var("SKIFF_BENCH_QUICK").is_ok_and(|v| v == "1");
    // cargo bench passes --bench; without it we run under cargo test: smoke-test sizes.
    let mut under_cargo_bench = false;
    let mut objects = env_usize("SKIFF_BENCH_OBJECTS")?;
    let mut updates = env_usize("SKIFF_BENCH_UPDATES")?;
    let mut watchers = env_usize("SKIFF_BENCH_WATCHERS")?;
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| -> Result<usize> {
            let v = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            v.parse()
                .with_context(|| format!("{flag} {v:?} is not a count"))
        };
        match arg.as_str() {
            "--bench" => under_cargo_bench = true,
            "--quick" => quick = true,
            "--objects" => objects = Some(value("--objects")?),
            "--updates" => updates = Some(value("--updates")?),
            "--watchers" => watchers = Some(value("--watchers")?),
            other => bail!(
                "unknown argument {other:?} (accepted: --quick, --objects N, --updates M, --watchers W)"
            ),
        }
    }
    quick |= !under_cargo_bench;
    let (n, m, w) = if quick {
        (300, 50, 10)
    } else {
        (10_000, 1_000, 100)
    };
    let sizes = Sizes {
        objects: objects.unwrap_or(n),
        updates: updates.unwrap_or(m),
        watchers: watchers.unwrap_or(w),
        quick,
    };
    ensure!(
        sizes.objects > 0 && sizes.updates > 0 && sizes.watchers > 0,
        "sizes must be positive: {sizes:?}"
    );
    Ok(sizes)
}

fn run() -> Result<()> {
    let sizes = parse_args()?;
    let started = Instant::now();
    eprintln!(
        "bench api: {} ConfigMaps, {} updates to {} watchers{}",
        sizes.objects,
        sizes.updates,
        sizes.watchers,
        if sizes.quick { " (quick)" } else { "" }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;

    let embedded = rt
        .block_on(bench_backend("embedded", None, None, sizes))
        .context("embedded backend")?;
    let etcd = EtcdProcess::start().context("starting etcd")?;
    let etcd_result = rt
        .block_on(bench_backend(
            "etcd",
            Some(etcd.endpoint()),
            etcd.pid(),
            sizes,
        ))
        .context("etcd backend")?;
    drop(etcd);

    let wall = started.elapsed();
    let machine = machine_notes();
    let table = render_table(&embedded, &etcd_result, sizes, &machine, wall);
    println!("{table}");
    let path = write_json(&embedded, &etcd_result, sizes, &machine, wall)?;
    eprintln!("bench api: results written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Results

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    samples: usize,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        if n == 0 {
            return Self::default();
        }
        // Nearest-rank percentile.
        let at = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            p50_ms: ms(at(0.50)),
            p99_ms: ms(at(0.99)),
            max_ms: ms(samples[n - 1]),
            samples: n,
        }
    }

    fn json(&self) -> Value {
        json!({"p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms, "samples": self.samples})
    }
}

/// CPU seconds spent by each process during a phase (from /proc), to see where time goes.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    apiserver: f64,
    etcd: f64,
    client: f64,
}

impl Cpu {
    fn json(&self) -> Value {
        json!({"apiserver_s": self.apiserver, "etcd_s": self.etcd, "bench_client_s": self.client})
    }
}

#[derive(Debug, Clone, Copy)]
struct Phase {
    /// Objects (create, list) or events (watch) per second.
    rate: f64,
    /// Per request (create), per page (list), per delivered event (watch).
    latency: Latency,
    secs: f64,
    cpu: Cpu,
}

impl Phase {
    fn json(&self) -> Value {
        json!({"per_second": self.rate, "latency": self.latency.json(), "seconds": self.secs, "cpu": self.cpu.json()})
    }
}

#[derive(Debug, Clone)]
struct BackendResult {
    create: Phase,
    list: Phase,
    watch: Phase,
    /// The single writer's PATCH latency during the watch phase.
    update_latency: Latency,
    updates_per_sec: f64,
    /// Watch conformance: updates that arrived typed ADDED instead of MODIFIED.
    added_not_modified: usize,
}

// ---------------------------------------------------------------------------------------
// One backend

async fn bench_backend(
    name: &'static str,
    etcd: Option<String>,
    etcd_pid: Option<u32>,
    sizes: Sizes,
) -> Result<BackendResult> {
    eprintln!("bench api: [{name}] starting apiserver");
    let server = Apiserver::start(etcd.as_deref())?;
    let cpu = CpuProbe {
        apiserver: server.pid(),
        etcd: etcd_pid,
    };
    let api = server.client()?;
    api.ensure_namespace().await?;

    eprintln!("bench api: [{name}] create {}", sizes.objects);
    let before = cpu.sample();
    let create = phase_timeout("create", api.create_all(sizes.objects)).await?;
    let create = create.with_cpu(cpu.since(before));

    eprintln!("bench api: [{name}] list x{LIST_ROUNDS}");
    let before = cpu.sample();
    let (list, rv) = phase_timeout("list", api.list_all(sizes.objects)).await?;
    let list = list.with_cpu(cpu.since(before));

    eprintln!(
        "bench api: [{name}] watch: {} updates to {} watchers",
        sizes.updates, sizes.watchers
    );
    let before = cpu.sample();
    let w = phase_timeout("watch", api.watch_fanout(&rv, sizes)).await?;
    let watch = w.delivery.with_cpu(cpu.since(before));
    // A watch that types updates of existing objects as ADDED is wrong, not slow.
    if w.added_not_modified > 0 {
        bail!(
            "[{name}] {} of {} update events arrived as ADDED, not MODIFIED",
            w.added_not_modified,
            sizes.updates * sizes.watchers
        );
    }

    drop(server);
    Ok(BackendResult {
        create,
        list,
        watch,
        update_latency: w.writer,
        updates_per_sec: w.updates_per_sec,
        added_not_modified: w.added_not_modified,
    })
}

async fn phase_timeout<T>(what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(PHASE_TIMEOUT, f)
        .await
        .with_context(|| format!("{what} phase did not finish within {PHASE_TIMEOUT:?}"))?
        .with_context(|| format!("{what} phase"))
}

/// Partial result of a phase before its CPU numbers are known.
struct Timed {
    rate: f64,
    latency: Latency,
    secs: f64,
}

impl Timed {
    fn with_cpu(self, cpu: Cpu) -> Phase {
        Phase {
            rate: self.rate,
            latency: self.latency,
            secs: self.secs,
            cpu,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The apiserver process

struct Apiserver {
    child: Child,
    base_url: String,
    kubeconfig: PathBuf,
    // Removed after the child is killed (fields drop after Drop::drop runs).
    _dir: tempfile::TempDir,
}

impl Apiserver {
    fn start(etcd: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-bench-api-")
            .tempdir()
            .context("creating the apiserver data dir")?;
        let log = std::fs::File::create(dir.path().join("apiserver.log"))
            .context("creating the apiserver log")?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff-apiserver"));
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--bind-address", "127.0.0.1", "--secure-port", "0"])
            // Per-request info logs would be measured too; keep only warnings.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(endpoint) = etcd {
            cmd.args(["--etcd-servers", endpoint]);
        }
        let mut child = cmd.spawn().context("starting skiff-apiserver")?;
        let stdout = child.stdout.take().context("apiserver stdout")?;
        // A thread reads stdout so the wait below can time out; it ends at EOF (exit).
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            base_url: String::new(),
            kubeconfig: PathBuf::new(),
            _dir: dir,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while server.kubeconfig.as_os_str().is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "apiserver did not report its address within {STARTUP_TIMEOUT:?}; log:\n{}",
                    server.log_tail()
                )
            })?;
            if let Some(rest) = line.strip_prefix("skiff-apiserver listening on ") {
                let url = rest.split_whitespace().next().unwrap_or_default();
                server.base_url = url.trim_end_matches('/').to_string();
            } else if let Some(path) = line.strip_prefix("kubeconfig: ") {
                server.kubeconfig = PathBuf::from(path.trim());
            }
        }
        ensure!(
            server.base_url.starts_with("https://127.0.0.1:"),
            "unexpected apiserver address {:?}",
            server.base_url
        );
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self._dir.path().join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// An HTTPS client with the admin client certificate, trusting only our CA.
    fn client(&self) -> Result<Api> {
        let text = std::fs::read_to_string(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config: serde_yaml::Value =
            serde_yaml::from_str(&text).context("parsing kubeconfig")?;
        let field = |section: &str, inner: &str, key: &str| -> Result<Vec<u8>> {
            let b64 = config[section][0][inner][key]
                .as_str()
                .with_context(|| format!("kubeconfig has no {section}[0].{inner}.{key}"))?;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .with_context(|| format!("kubeconfig {key} is not base64"))
        };
        let ca = field("clusters", "cluster", "certificate-authority-data")?;
        let mut identity = field("users", "user", "client-key-data")?;
        identity.push(b'\n');
        identity.extend(field("users", "user", "client-certificate-data")?);
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&ca).context("parsing the CA certificate")?,
            )
            .identity(
                reqwest::Identity::from_pem(&identity).context("parsing the client identity")?,
            )
            .no_proxy()
            .build()
            .context("building the HTTPS client")?;
        Ok(Api {
            http,
            base: format!("{}/api/v1/namespaces/{NAMESPACE}/configmaps", self.base_url),
            root: self.base_url.clone(),
            epoch: Instant::now(),
        })
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        // SIGKILL to the child's pid, then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Workload

struct Api {
    http: reqwest::Client,
    /// .../api/v1/namespaces/<ns>/configmaps
    base: String,
    root: String,
    /// Time base for the send timestamps written into ConfigMaps (same process, so the
    /// watchers can subtract them from their own receive time).
    epoch: Instant,
}

fn cm_name(i: usize) -> String {
    format!("bench-{i:06}")
}

async fn expect_status(resp: reqwest::Response, ok: &[u16], what: &str) -> Result<Value> {
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("{what}: reading the response"))?;
    if !ok.contains(&status.as_u16()) {
        bail!("{what}: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("{what}: response is not JSON"))
}

impl Api {
    async fn ensure_namespace(&self) -> Result<()> {
        let resp = self
            .http
            .post(format!("{}/api/v1/namespaces", self.root))
            .timeout(REQUEST_TIMEOUT)
            .json(
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
            )
            .send()
            .await
            .context("creating the bench namespace")?;
        expect_status(resp, &[201, 409], "creating the bench namespace").await?;
        Ok(())
    }

    async fn create_all(&self, n: usize) -> Result<Timed> {
        let payload = "x".repeat(PAYLOAD_BYTES);
        let start = Instant::now();
        let latencies: Vec<Duration> = futures::stream::iter(0..n)
            .map(|i| {
                let body = json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": cm_name(i), "labels": {"app": "skiff-bench"}},
                    "data": {"seq": "-1", "sent_ns": "0", "payload": payload},
                });
                async move {
                    let t = Instant::now();
                    let what = format!("creating {}", cm_name(i));
                    let resp = self
                        .http
                        .post(&self.base)
                        .timeout(REQUEST_TIMEOUT)
                        .json(&body)
                        .send()
                        .await
                        .with_context(|| what.clone())?;
                    expect_status(resp, &[201], &what).await?;
                    Ok::<_, anyhow::Error>(t.elapsed())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        let secs = start.elapsed().as_secs_f64();
        Ok(Timed {
            rate: n as f64 / secs,
            latency: Latency::of(latencies),
            secs,
        })
    }

    /// Lists everything LIST_ROUNDS times; returns the last list's resourceVersion.
    async fn list_all(&self, n: usize) -> Result<(Timed, String)> {
        let max_pages = n / PAGE_LIMIT + 2;
        let mut pages = Vec::new();
        let mut rv = String::new();
        let start = Instant::now();
        for round in 0..LIST_ROUNDS {
            let mut names = HashSet::with_capacity(n);
            let mut cont: Option<String> = None;
            for page in 0.. {
                ensure!(
                    page < max_pages,
                    "round {round}: more than {max_pages} pages for {n} objects"
                );
                let mut req = self
                    .http
                    .get(&self.base)
                    .timeout(REQUEST_TIMEOUT)
                    .query(&[("limit", PAGE_LIMIT.to_string())]);
                if let Some(c) = &cont {
                    req = req.query(&[("continue", c)]);
                }
                let t = Instant::now();
                let resp = req.send().await.context("listing ConfigMaps")?;
                let list = expect_status(resp, &[200], "listing ConfigMaps").await?;
                pages.push(t.elapsed());
                let items = list["items"].as_array().context("list has no items")?;
                ensure!(
                    items.len() <= PAGE_LIMIT,
                    "page of {} items with limit={PAGE_LIMIT}",
                    items.len()
                );
                for item in items {
                    let name = item["metadata"]["name"]
                        .as_str()
                        .context("item without name")?;
                    ensure!(
                        names.insert(name.to_string()),
                        "round {round}: {name} listed twice"
                    );
                }
                if page == 0 {
                    rv = list["metadata"]["resourceVersion"]
                        .as_str()
                        .context("list has no resourceVersion")?
                        .to_string();
                }
                cont = list["metadata"]["continue"]
                    .as_str()
                    .filter(|c| !c.is_empty())
                    .map(str::to_string);
                if cont.is_none() {
                    break;
                }
            }
            ensure!(
                names.len() == n,
                "round {round}: paginated list returned {} ConfigMaps, created {n}",
                names.len()
            );
        }
        let secs = start.elapsed().as_secs_f64();
        let timed = Timed {
            rate: (n * LIST_ROUNDS) as f64 / secs,
            latency: Latency::of(pages),
            secs,
        };
        Ok((timed, rv))
    }

    /// W watchers from `rv`, then M merge-patches from one writer.
    async fn watch_fanout(&self, rv: &str, sizes: Sizes) -> Result<WatchResult> {
        let mut watchers = Vec::with_capacity(sizes.watchers);
        for w in 0..sizes.watchers {
            // reqwest's per-request timeout would also cut the stream: bound only the
            // headers here; the body is read under PHASE_TIMEOUT.
            let open = self
                .http
                .get(&self.base)
                .query(&[("watch", "1"), ("resourceVersion", rv)])
                .send();
            let resp = tokio::time::timeout(REQUEST_TIMEOUT, open)
                .await
                .with_context(|| format!("opening watch {w}: no response in {REQUEST_TIMEOUT:?}"))?
                .with_context(|| format!("opening watch {w}"))?;
            ensure!(
                resp.status().is_success(),
                "watch {w}: HTTP {}",
                resp.status()
            );
            let epoch = self.epoch;
            let updates = sizes.updates;
            watchers.push(tokio::spawn(async move {
                receive(resp, updates, epoch)
                    .await
                    .with_context(|| format!("watcher {w}"))
            }));
        }

        let start = Instant::now();
        let mut writes = Vec::with_capacity(sizes.updates);
        for seq in 0..sizes.updates {
            let name = cm_name(seq % sizes.objects);
            let t = Instant::now();
            let sent_ns = t.duration_since(self.epoch).as_nanos();
            let patch = json!({"data": {"seq": seq.to_string(), "sent_ns": sent_ns.to_string()}});
            let resp = self
                .http
                .patch(format!("{}/{name}", self.base))
                .timeout(REQUEST_TIMEOUT)
                .header("Content-Type", "application/merge-patch+json")
                .body(patch.to_string())
                .send()
                .await
                .with_context(|| format!("updating {name}"))?;
            expect_status(resp, &[200], &format!("updating {name}")).await?;
            writes.push(t.elapsed());
        }
        let write_secs = start.elapsed().as_secs_f64();

        let mut delivered = Vec::with_capacity(sizes.updates * sizes.watchers);
        let mut added_not_modified = 0;
        for w in watchers {
            let d = w.await.context("watcher task panicked")??;
            delivered.extend(d.latencies);
            added_not_modified += d.added_not_modified;
        }
        let secs = start.elapsed().as_secs_f64();
        let total = delivered.len();
        ensure!(
            total == sizes.updates * sizes.watchers,
            "delivered {total} events, expected {}",
            sizes.updates * sizes.watchers
        );
        let timed = Timed {
            rate: total as f64 / secs,
            latency: Latency::of(delivered),
            secs,
        };
        Ok(WatchResult {
            delivery: timed,
            writer: Latency::of(writes),
            updates_per_sec: sizes.updates as f64 / write_secs,
            added_not_modified,
        })
    }
}

struct WatchResult {
    delivery: Timed,
    writer: Latency,
    updates_per_sec: f64,
    added_not_modified: usize,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: WatchObject,
}

#[derive(Deserialize)]
struct WatchObject {
    #[serde(default)]
    data: HashMap<String, String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Default)]
struct Delivery {
    /// Send-to-receive time of each update, in write order.
    latencies: Vec<Duration>,
    /// Updates delivered as ADDED although the object existed before the watch started.
    added_not_modified: usize,
}

/// Reads one watch stream until it has seen all `updates`, checking they arrive in write
/// order.
async fn receive(mut resp: reqwest::Response, updates: usize, epoch: Instant) -> Result<Delivery> {
    let mut delivery = Delivery {
        latencies: Vec::with_capacity(updates),
        added_not_modified: 0,
    };
    let latencies = &mut delivery.latencies;
    let mut buf: Vec<u8> = Vec::new();
    while latencies.len() < updates {
        let chunk = resp
            .chunk()
            .await
            .context("reading the watch stream")?
            .with_context(|| {
                format!(
                    "watch stream ended after {} of {updates} events",
                    latencies.len()
                )
            })?;
        let now = Instant::now().duration_since(epoch);
        buf.extend_from_slice(&chunk);
        let mut consumed = 0;
        while let Some(nl) = buf[consumed..].iter().position(|&b| b == b'\n') {
            let line = &buf[consumed..consumed + nl];
            consumed += nl + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: WatchEvent =
                serde_json::from_slice(line).context("watch event is not JSON")?;
            match event.kind.as_str() {
                "MODIFIED" => {}
                // Not a lost event, but wrong: every object existed at the watch's
                // resourceVersion. Counted and reported instead of aborting the run.
                "ADDED" => delivery.added_not_modified += 1,
                "BOOKMARK" => continue,
                "ERROR" => bail!("watch error: {}", event.object.message.unwrap_or_default()),
                other => bail!("unexpected {other} event"),
            }
            let field = |k: &str| -> Result<u128> {
                event
                    .object
                    .data
                    .get(k)
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{} event without a numeric data.{k}", event.kind))
            };
            let seq = field("seq")?;
            ensure!(
                seq == latencies.len() as u128,
                "got update {seq}, expected {} (lost or reordered)",
                latencies.len()
            );
            let sent = Duration::from_nanos(field("sent_ns")? as u64);
            latencies.push(now.saturating_sub(sent));
        }
        buf.drain(..consumed);
    }
    Ok(delivery)
}

// ---------------------------------------------------------------------------------------
// CPU accounting

struct CpuProbe {
    apiserver: u32,
    etcd: Option<u32>,
}

#[derive(Clone, Copy)]
struct CpuSample {
    apiserver: f64,
    etcd: f64,
    client: f64,
}

impl CpuProbe {
    fn sample(&self) -> CpuSample {
        CpuSample {
            apiserver: proc_cpu_secs(&self.apiserver.to_string()),
            etcd: self.etcd.map_or(0.0, |p| proc_cpu_secs(&p.to_string())),
            client: proc_cpu_secs("self"),
        }
    }

    fn since(&self, before: CpuSample) -> Cpu {
        let now = self.sample();
        Cpu {
            apiserver: now.apiserver - before.apiserver,
            etcd: now.etcd - before.etcd,
            client: now.client - before.client,
        }
    }
}

/// utime + stime of a process in seconds (0 when /proc is unreadable).
fn proc_cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name (which may contain spaces).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks / if hz > 0 { hz as f64 } else { 100.0 }
}

// ---------------------------------------------------------------------------------------
// Report

struct Machine {
    cores: usize,
    cpu_model: String,
    kernel: String,
    etcd_version: String,
    profile: &'static str,
}

fn machine_notes() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let etcd_bin = std::env::var("SKIFF_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let etcd_version = Command::new(etcd_bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        kernel,
        etcd_version,
        profile: if cfg!(debug_assertions) {
            "debug (numbers not representative)"
        } else {
            "release"
        },
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn render_table(
    e: &BackendResult,
    d: &BackendResult,
    sizes: Sizes,
    m: &Machine,
    wall: Duration,
) -> String {
    let mut out = format!(
        "\n### skiff apiserver: {} ConfigMaps, list limit={PAGE_LIMIT} x{LIST_ROUNDS}, {} updates x {} watchers{}\n\n",
        sizes.objects,
        sizes.updates,
        sizes.watchers,
        if sizes.quick { " (quick)" } else { "" }
    );
    out.push_str("| phase | metric | embedded | etcd | embedded÷etcd |\n");
    out.push_str("|---|---|---:|---:|---:|\n");
    let mut row = |phase: &str, metric: &str, ev: f64, dv: f64, with_ratio: bool| {
        let r = if with_ratio {
            fmt_num(ratio(ev, dv))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {phase} | {metric} | {} | {} | {r} |\n",
            fmt_num(ev),
            fmt_num(dv),
        ));
    };
    let phases = [
        ("create", "objects/s", "per request", &e.create, &d.create),
        (
            "list (paginated)",
            "objects/s",
            "per page",
            &e.list,
            &d.list,
        ),
        (
            "watch fan-out",
            "events/s delivered",
            "delivery",
            &e.watch,
            &d.watch,
        ),
    ];
    for (name, unit, per, pe, pd) in phases {
        let server = |p: &Phase| p.cpu.apiserver + p.cpu.etcd;
        row(name, unit, pe.rate, pd.rate, true);
        row(
            "",
            &format!("p50 ms {per}"),
            pe.latency.p50_ms,
            pd.latency.p50_ms,
            true,
        );
        row(
            "",
            &format!("p99 ms {per}"),
            pe.latency.p99_ms,
            pd.latency.p99_ms,
            true,
        );
        row("", "wall s", pe.secs, pd.secs, true);
        row("", "CPU s apiserver + etcd", server(pe), server(pd), true);
        row("", "CPU s of which etcd", pe.cpu.etcd, pd.cpu.etcd, false);
        row(
            "",
            "CPU s bench client",
            pe.cpu.client,
            pd.cpu.client,
            false,
        );
    }
    let (ew, dw) = (&e.update_latency, &d.update_latency);
    row(
        "",
        "writer updates/s",
        e.updates_per_sec,
        d.updates_per_sec,
        true,
    );
    row("", "writer p50 ms per update", ew.p50_ms, dw.p50_ms, true);
    row("", "writer p99 ms per update", ew.p99_ms, dw.p99_ms, true);
    out.push_str(&format!(
        "| | watch events typed ADDED, not MODIFIED (should be 0) | {} | {} | |\n",
        e.added_not_modified, d.added_not_modified
    ));
    out.push_str(&format!(
        "\nThroughput ratio > 1 and latency ratio < 1 mean the embedded store is faster. \
         create: {CONCURRENCY} requests in flight; watch latency: the writer's send time \
         (stored in the ConfigMap) to receipt by each watcher; one writer, no pacing.\n\
         Machine: {} cores ({}), Linux {}, {}; {} build; apiserver, etcd and this client \
         share the cores; HTTPS on 127.0.0.1. Whole run: {:.1} s.\n",
        m.cores,
        m.cpu_model,
        m.kernel,
        m.etcd_version,
        m.profile,
        wall.as_secs_f64()
    ));
    out
}

fn target_dir() -> PathBuf {
    // The bench runs from target/<profile>/deps/; fall back to the workspace's target/.
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let deps = exe.parent()?;
            (deps.file_name()? == "deps").then(|| deps.parent()?.parent().map(Path::to_path_buf))?
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn write_json(
    e: &BackendResult,
    d: &BackendResult,
    sizes: Sizes,
    m: &Machine,
    wall: Duration,
) -> Result<PathBuf> {
    let backend = |r: &BackendResult| {
        json!({
            "create": r.create.json(),
            "list": r.list.json(),
            "watch": r.watch.json(),
            "writer": {"updates_per_second": r.updates_per_sec, "latency": r.update_latency.json()},
            "watch_added_not_modified": r.added_not_modified,
        })
    };
    let doc = json!({
        "bench": "api",
        "params": {
            "objects": sizes.objects, "updates": sizes.updates, "watchers": sizes.watchers,
            "quick": sizes.quick, "create_concurrency": CONCURRENCY,
            "page_limit": PAGE_LIMIT, "list_rounds": LIST_ROUNDS, "payload_bytes": PAYLOAD_BYTES,
        },
        "machine": {
            "cores": m.cores, "cpu_model": m.cpu_model, "kernel": m.kernel,
            "etcd_version": m.etcd_version, "profile": m.profile,
        },
        "wall_seconds": wall.as_secs_f64(),
        "embedded": backend(e),
        "etcd": backend(d),
        // Throughput ratios (embedded÷etcd); > 1 means embedded is faster.
        "ratio_embedded_over_etcd": {
            "create_per_second": ratio(e.create.rate, d.create.rate),
            "list_per_second": ratio(e.list.rate, d.list.rate),
            "watch_events_per_second": ratio(e.watch.rate, d.watch.rate),
            "create_p99": ratio(e.create.latency.p99_ms, d.create.latency.p99_ms),
            "list_page_p99": ratio(e.list.latency.p99_ms, d.list.latency.p99_ms),
            "watch_delivery_p99": ratio(e.watch.latency.p99_ms, d.watch.latency.p99_ms),
        },
    });
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("api.json");
    // NaN (an empty ratio) is not JSON; serde_json writes it as null.
    let text = serde_json::to_string_pretty(&doc).context("serialising results")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
