//! `cargo xtask images`: builds the sample workload's images and pushes them to the local
//! registry on 10.90.0.1:5000, the host's address on the test bridge skiff0 (the bridge
//! is created first if it is missing; the registry is started here if it is not running;
//! `down` stops it and removes the bridge).
//!
//! - `skiff/echo:<tag>`: the static echo server (crate images/echo) as `/echo`,
//!   entrypoint `["/echo"]`, plus busybox for debugging (`kubectl exec ... -- sh`);
//! - `skiff/busybox:<tag>`: busybox-static with one symlink per applet, cmd `sh`.
//!
//! Each image is one deterministic layer (mtime 0, uid/gid 0) written as an OCI layout
//! under .skiff/images/<name>, then copied with `skopeo copy` (plain http).
//! The echo binary is built for x86_64-unknown-linux-musl when that target is installed
//! (`cargo xtask setup` adds it), else glibc with `+crt-static`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{up, util};

/// The registry `up` and `images` use (the sample manifest names it): the host's address
/// on the test bridge, so the nodes (network namespaces on the bridge) reach it.
pub const REGISTRY: &str = "10.90.0.1:5000";
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const BUSYBOX_BIN: &str = "/bin/busybox";
const MUSL: &str = crate::setup::MUSL_TARGET;
const GNU: &str = "x86_64-unknown-linux-gnu";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Tag to push.
    #[arg(long, default_value = "latest")]
    pub tag: String,
}

pub fn run(args: &Args) -> Result<()> {
    let dir = up::state_dir();
    std::fs::create_dir_all(&dir)?;
    // The registry listens on the bridge address.
    up::ensure_bridge()?;
    ensure_registry(&dir)?;
    let echo = build_echo()?;
    let busybox = busybox_builder()?;
    let images = [
        (
            "echo",
            busybox
                .clone()
                .file_from_host("echo", &echo, 0o755)?
                .entrypoint(&["/echo"])
                .build()?,
        ),
        ("busybox", busybox.cmd(&["sh"]).build()?),
    ];
    for (name, image) in images {
        let layout = dir.join("images").join(name);
        let _ = std::fs::remove_dir_all(&layout);
        image.write_layout(&layout, &args.tag)?;
        let dest = format!("{REGISTRY}/skiff/{name}:{}", args.tag);
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--insecure-policy",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{}", layout.display(), args.tag))
            .arg(format!("docker://{dest}"))
            .output()
            .context("cannot run skopeo (install it with `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy to {dest} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        println!("[images] pushed {dest} ({})", image.manifest_digest);
    }
    Ok(())
}

/// Starts docker-registry on [`REGISTRY`] with storage under .skiff/registry unless a
/// registry already answers there.
fn ensure_registry(dir: &Path) -> Result<()> {
    if registry_ok() {
        return Ok(());
    }
    if up::running_pid("registry").is_some() {
        bail!("the registry started earlier (.skiff/registry.pid) does not answer on {REGISTRY}");
    }
    let rdir = dir.join("registry");
    std::fs::create_dir_all(rdir.join("storage"))?;
    let config = rdir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {REGISTRY}\n",
            rdir.join("storage").display()
        ),
    )?;
    println!("[images] starting the registry on {REGISTRY}");
    let pid = up::spawn_daemon(
        "registry",
        Command::new(REGISTRY_BIN).arg("serve").arg(&config),
    )?;
    let start = Instant::now();
    while !registry_ok() {
        if !Path::new(&format!("/proc/{pid}")).exists() || start.elapsed() > Duration::from_secs(20)
        {
            let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
            bail!("docker-registry did not answer on {REGISTRY}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `GET /v2/` answers 200.
fn registry_ok() -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &REGISTRY.parse().expect("registry address"),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {REGISTRY}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200")
}

/// Builds skiff-echo (release, static) and returns the binary's path.
fn build_echo() -> Result<PathBuf> {
    let musl = util::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|s| s.lines().any(|l| l.trim() == MUSL));
    let target = if musl { MUSL } else { GNU };
    println!("[images] building skiff-echo (release, static, {target})");
    let mut cmd = util::cargo();
    cmd.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "skiff-echo",
        "--target",
        target,
    ]);
    if !musl {
        // With an explicit --target, RUSTFLAGS apply to the target only (not build scripts).
        cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
    }
    util::run_cmd("cargo build -p skiff-echo", &mut cmd)?;
    let bin = util::root().join(format!("target/{target}/release/skiff-echo"));
    let data = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    // A dynamically linked ELF has a PT_INTERP program header; a static one does not.
    if elf_has_interp(&data) {
        bail!("{} is not statically linked", bin.display());
    }
    Ok(bin)
}

/// True if the ELF64 file has a PT_INTERP program header (needs a dynamic loader).
fn elf_has_interp(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return true; // not an ELF64 LE file: treat as unusable
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    (0..phnum as usize).any(|i| {
        let o = phoff as usize + i * phentsize as usize;
        elf.get(o..o + 4) == Some(&3u32.to_le_bytes()[..]) // PT_INTERP
    })
}

/// busybox-static plus a symlink per applet under /bin.
fn busybox_builder() -> Result<ImageBuilder> {
    let out = Command::new(BUSYBOX_BIN)
        .arg("--list")
        .output()
        .with_context(|| {
            format!("{BUSYBOX_BIN} (install busybox-static with `cargo xtask setup`)")
        })?;
    let mut b = ImageBuilder::new().file_from_host("bin/busybox", BUSYBOX_BIN, 0o755)?;
    for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            b = b.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    Ok(b)
}

fn sha256_digest(data: &[u8]) -> String {
    let mut s = String::from("sha256:");
    for b in Sha256::digest(data).iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[derive(Debug, Clone)]
enum Entry {
    Dir(u32),
    File(Vec<u8>, u32),
    Symlink(String),
}

/// A one-layer image built from files (the same layout as skiff-agent's test images).
#[derive(Debug, Clone)]
struct ImageBuilder {
    entries: BTreeMap<String, Entry>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl ImageBuilder {
    fn new() -> Self {
        let mut b = ImageBuilder {
            entries: BTreeMap::new(),
            entrypoint: vec![],
            cmd: vec![],
        };
        for d in [
            "bin", "dev", "etc", "proc", "sys", "root", "var", "usr", "usr/bin",
        ] {
            b.entries.insert(d.into(), Entry::Dir(0o755));
        }
        b.entries.insert("tmp".into(), Entry::Dir(0o1777));
        b.entries.insert(
            "etc/passwd".into(),
            Entry::File(
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                    .to_vec(),
                0o644,
            ),
        );
        b.entries.insert(
            "etc/group".into(),
            Entry::File(b"root:x:0:\nnobody:x:65534:\n".to_vec(), 0o644),
        );
        b
    }

    fn file_from_host(mut self, path: &str, host: impl AsRef<Path>, mode: u32) -> Result<Self> {
        let host = host.as_ref();
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.entries
            .insert(path.trim_matches('/').into(), Entry::File(data, mode));
        Ok(self)
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries
            .insert(path.trim_matches('/').into(), Entry::Symlink(target.into()));
        self
    }

    fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    fn build(&self) -> Result<OciImage> {
        // BTreeMap order puts parent directories before their entries.
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match entry {
                Entry::Dir(mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Entry::File(data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice())?;
                }
                Entry::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)?;
                }
            }
        }
        let tar = tar.into_inner()?;
        let diff_id = sha256_digest(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar)?;
        let layer = gz.finish()?;
        let layer_digest = sha256_digest(&layer);
        let mut cfg = serde_json::Map::new();
        cfg.insert(
            "Env".into(),
            serde_json::json!(["PATH=/bin:/usr/bin:/sbin:/usr/sbin"]),
        );
        if !self.entrypoint.is_empty() {
            cfg.insert("Entrypoint".into(), serde_json::json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            cfg.insert("Cmd".into(), serde_json::json!(self.cmd));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": cfg,
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created_by": "cargo xtask images" }],
        }))?;
        let config_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))?;
        let manifest_digest = sha256_digest(&manifest);
        Ok(OciImage {
            blobs: vec![
                (layer_digest, layer),
                (config_digest, config),
                (manifest_digest.clone(), manifest),
            ],
            manifest_digest,
        })
    }
}

struct OciImage {
    /// (digest, bytes): layer, config, manifest (last).
    blobs: Vec<(String, Vec<u8>)>,
    manifest_digest: String,
}

impl OciImage {
    /// Writes an OCI image layout with one manifest named `tag`.
    fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        for (digest, data) in &self.blobs {
            std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), data)?;
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let manifest_len = self.blobs.last().map_or(0, |(_, m)| m.len());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.manifest_digest,
                "size": manifest_len,
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}
