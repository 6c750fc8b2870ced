//! Test images without a public registry: a local `docker-registry` on 127.0.0.1 and tiny
//! OCI images built here, in Rust, from files on this machine (busybox-static, the
//! project's own static binaries).
//!
//! - [`LocalRegistry::start`] runs Debian's `/usr/bin/docker-registry serve config.yml` on
//!   127.0.0.1:<free port> with filesystem storage under the given directory, and stops it
//!   by pid on drop.
//! - [`ImageBuilder`] makes a one-layer image (deterministic tar.gz: mtime 0, uid/gid 0),
//!   its config and OCI manifest ([`OciImage`]); [`OciImage::write_layout`] writes an OCI
//!   image layout (for skopeo/ctr import), [`OciImage::push`] pushes it over plain http.
//! - [`busybox_image`]: /bin/busybox plus a symlink per applet (sh, echo, sleep, cat, ls,
//!   wget, nc, httpd, ...), `PATH=/bin`, cmd `sh`.

/// Registry logins for [`OciImage::push_with_auth`].
pub use oci_client::secrets::RegistryAuth;

use std::{
    collections::BTreeMap,
    fs, io,
    io::Write,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

/// Debian's registry binary (package `docker-registry`, distribution 2.8).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// The static busybox from Debian's `busybox-static`.
pub const BUSYBOX_BIN: &str = "/bin/busybox";

/// Media types written by the builder.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A docker-registry serving 127.0.0.1:<port>, stopped on drop.
#[derive(Debug)]
pub struct LocalRegistry {
    child: Option<Child>,
    ip: std::net::Ipv4Addr,
    port: u16,
    dir: PathBuf,
}

impl LocalRegistry {
    /// Starts the registry with storage under `dir` (created if missing) and waits until
    /// `GET /v2/` answers 200 (at most 20 s).
    pub fn start(dir: impl AsRef<Path>) -> io::Result<Self> {
        Self::start_on(dir, std::net::Ipv4Addr::LOCALHOST)
    }

    /// Like [`LocalRegistry::start`], listening on `ip` (e.g. a test bridge's host
    /// address, so agents in node network namespaces can pull).
    pub fn start_on(dir: impl AsRef<Path>, ip: std::net::Ipv4Addr) -> io::Result<Self> {
        Self::start_with(dir, ip, None)
    }

    /// Like [`LocalRegistry::start`], with basic authentication: `htpasswd` is the content
    /// of the registry's htpasswd file (`user:<bcrypt hash>` lines; the registry takes
    /// bcrypt only). Without a login, requests get 401.
    pub fn start_with_htpasswd(dir: impl AsRef<Path>, htpasswd: &str) -> io::Result<Self> {
        Self::start_with(dir, std::net::Ipv4Addr::LOCALHOST, Some(htpasswd))
    }

    fn start_with(
        dir: impl AsRef<Path>,
        ip: std::net::Ipv4Addr,
        htpasswd: Option<&str>,
    ) -> io::Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir.join("storage"))?;
        let dir = dir.canonicalize()?;
        if !Path::new(REGISTRY_BIN).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{REGISTRY_BIN} is missing: run `cargo xtask setup` (apt-get install docker-registry)"
                ),
            ));
        }
        let port = free_port()?;
        let config = dir.join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {ip}:{port}\n",
            dir.join("storage").display()
        );
        if let Some(h) = htpasswd {
            fs::write(dir.join("htpasswd"), h)?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: skiff\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        fs::write(&config, yaml)?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {REGISTRY_BIN}: {e}")))?;
        let mut me = LocalRegistry {
            child: Some(child),
            ip,
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                me.child = None;
                return Err(io::Error::other(format!(
                    "docker-registry exited early ({status}): {}",
                    fs::read_to_string(me.dir.join("registry.log")).unwrap_or_default()
                )));
            }
            if me.v2_ok() {
                return Ok(me);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "docker-registry did not answer /v2/ within 20 s",
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn v2_ok(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((self.ip, self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 64];
        let n = io::Read::read(&mut s, &mut buf).unwrap_or(0);
        // 401: up, with authentication.
        let head = String::from_utf8_lossy(&buf[..n]);
        [
            "HTTP/1.0 200",
            "HTTP/1.1 200",
            "HTTP/1.0 401",
            "HTTP/1.1 401",
        ]
        .iter()
        .any(|p| head.starts_with(p))
    }

    /// `127.0.0.1:<port>`: the registry part of image references, and the entry to put in
    /// the insecure (plain http) hosts list.
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>/<name>` for a `repo:tag` name.
    pub fn image_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// Builds a one-layer OCI image from files given here.
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    entries: BTreeMap<String, Entry>,
    env: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    working_dir: String,
}

impl ImageBuilder {
    /// An empty image with `PATH=/bin:/usr/bin:/sbin:/usr/sbin` and the usual top-level
    /// directories (bin, dev, etc, proc, sys, tmp, var, root).
    pub fn new() -> Self {
        let mut b = ImageBuilder {
            env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
            ..Default::default()
        };
        for d in [
            "bin", "dev", "etc", "proc", "sys", "root", "var", "usr", "usr/bin",
        ] {
            b = b.dir(d, 0o755);
        }
        b = b.dir("tmp", 0o1777);
        b = b.file_bytes(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
            0o644,
        );
        b.file_bytes("etc/group", b"root:x:0:\nnobody:x:65534:\n".to_vec(), 0o644)
    }

    /// Adds a directory (path relative to /).
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entries.insert(clean(path), Entry::Dir { mode });
        self
    }

    /// Adds a file with these contents.
    pub fn file_bytes(mut self, path: &str, data: Vec<u8>, mode: u32) -> Self {
        self.entries.insert(clean(path), Entry::File { data, mode });
        self
    }

    /// Adds a copy of a file of this machine (e.g. a static binary).
    pub fn file_from_host(self, path: &str, host: impl AsRef<Path>, mode: u32) -> io::Result<Self> {
        let host = host.as_ref();
        let data = fs::read(host)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", host.display())))?;
        Ok(self.file_bytes(path, data, mode))
    }

    /// Adds a symlink `path -> target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.insert(
            clean(path),
            Entry::Symlink {
                target: target.into(),
            },
        );
        self
    }

    /// Adds an environment variable `K=V` to the image config.
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.into());
        self
    }

    /// Sets the image's Entrypoint.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets the image's Cmd.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets the image's WorkingDir.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = dir.into();
        self
    }

    /// Writes the layer (tar, gzip), the config and the manifest.
    pub fn build(&self) -> io::Result<OciImage> {
        // Parent directories first: BTreeMap order puts "bin" before "bin/sh".
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match entry {
                Entry::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), io::empty())?;
                }
                Entry::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice())?;
                }
                Entry::Symlink { target } => {
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
        cfg.insert("Env".into(), serde_json::json!(self.env));
        if !self.entrypoint.is_empty() {
            cfg.insert("Entrypoint".into(), serde_json::json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            cfg.insert("Cmd".into(), serde_json::json!(self.cmd));
        }
        if !self.working_dir.is_empty() {
            cfg.insert("WorkingDir".into(), serde_json::json!(self.working_dir));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "config": cfg,
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created_by": "skiff test_images::ImageBuilder" }],
        }))?;
        let config_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": { "mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": MEDIA_TYPE_LAYER_GZIP, "digest": layer_digest, "size": layer.len() }],
        }))?;
        let manifest_digest = sha256_digest(&manifest);
        Ok(OciImage {
            config,
            config_digest,
            layer,
            layer_digest,
            diff_id,
            manifest,
            manifest_digest,
        })
    }
}

fn clean(path: &str) -> String {
    path.trim_matches('/').to_string()
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A built one-layer image.
#[derive(Debug, Clone)]
pub struct OciImage {
    pub config: Vec<u8>,
    pub config_digest: String,
    /// The layer, tar+gzip.
    pub layer: Vec<u8>,
    pub layer_digest: String,
    /// sha256 of the uncompressed layer tar (the config's rootfs.diff_ids entry).
    pub diff_id: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

impl OciImage {
    /// Writes an OCI image layout (oci-layout, index.json with ref name `tag`, blobs/).
    pub fn write_layout(&self, dir: impl AsRef<Path>, tag: &str) -> io::Result<()> {
        let dir = dir.as_ref();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        for (digest, data) in [
            (&self.layer_digest, &self.layer),
            (&self.config_digest, &self.config),
            (&self.manifest_digest, &self.manifest),
        ] {
            fs::write(blobs.join(digest.trim_start_matches("sha256:")), data)?;
        }
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [{
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": self.manifest_digest,
                "size": self.manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }

    /// Pushes layer, config and manifest to `reference` (e.g. `127.0.0.1:5000/skiff/busybox:latest`)
    /// over plain http. Returns the manifest digest.
    pub async fn push(&self, reference: &str) -> Result<String, String> {
        self.push_with_auth(reference, &oci_client::secrets::RegistryAuth::Anonymous)
            .await
    }

    /// [`OciImage::push`] with a registry login.
    pub async fn push_with_auth(
        &self,
        reference: &str,
        auth: &oci_client::secrets::RegistryAuth,
    ) -> Result<String, String> {
        let r: oci_client::Reference = reference
            .parse()
            .map_err(|e| format!("bad reference {reference}: {e}"))?;
        let client = super::runtime::registry_client(&[r.resolve_registry().to_string()])?;
        client
            .auth(&r, auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| format!("auth for {reference}: {e}"))?;
        for (data, digest) in [
            (&self.layer, &self.layer_digest),
            (&self.config, &self.config_digest),
        ] {
            client
                .push_blob(&r, data.clone(), digest)
                .await
                .map_err(|e| format!("push blob {digest} to {reference}: {e}"))?;
        }
        client
            .push_manifest_raw(
                &r,
                self.manifest.clone(),
                http::HeaderValue::from_static(MEDIA_TYPE_MANIFEST),
            )
            .await
            .map_err(|e| format!("push manifest to {reference}: {e}"))?;
        Ok(self.manifest_digest.clone())
    }
}

/// The busybox test image: /bin/busybox (static) and a symlink per applet it lists.
pub fn busybox_image() -> io::Result<OciImage> {
    busybox_builder()?.cmd(&["sh"]).build()
}

/// The busybox image as a builder, to add more files (e.g. a test server binary).
pub fn busybox_builder() -> io::Result<ImageBuilder> {
    let out = Command::new(BUSYBOX_BIN)
        .arg("--list")
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{BUSYBOX_BIN}: {e} (install busybox-static with `cargo xtask setup`)"),
            )
        })?;
    let mut b = ImageBuilder::new().file_from_host("bin/busybox", BUSYBOX_BIN, 0o755)?;
    for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            b = b.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    Ok(b)
}
