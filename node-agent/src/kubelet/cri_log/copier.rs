//! The CRI log copier itself: std only, so that it compiles both into the agent library
//! (tests, the `skiff-agent --cri-log` fallback) and into the small `skiff-cri-log`
//! binary the runc shim starts once per container (src/bin/cri_log.rs). That binary
//! links nothing but std: no tokio, no TLS, no kube — it starts in well under a
//! millisecond where the whole agent binary (~35 MB) took several.
//!
//! Arguments (flag/value pairs in any order, since containerd passes the `binary://`
//! URI's query as a Go map): `--cri-log FILE [--max-size BYTES] [--max-files N]`.
//!
//! Rotation (the kubelet's containerLogMaxSize / containerLogMaxFiles): once FILE reaches
//! `--max-size` bytes the copier renames it to `FILE.<YYYYMMDD-HHMMSS.nanos>` (UTC),
//! opens a new FILE and removes the oldest rotated files so that at most `--max-files`
//! files (FILE included) remain. FILE is always the newest part: what `kubectl logs`
//! reads. The kubelet does the same from outside (it asks the runtime to reopen the file
//! after renaming it); here the copier owns the file, so it rotates it itself, right
//! after the write that crossed the limit. `--max-size 0` never rotates.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

/// The flag that names the log file (also what makes the agent binary a copier).
pub const COPIER_FLAG: &str = "--cri-log";
pub const MAX_SIZE_FLAG: &str = "--max-size";
pub const MAX_FILES_FLAG: &str = "--max-files";

/// Longest message of one line; longer output lines are split into P lines.
pub const MAX_LINE: usize = 16 * 1024;

/// The kubelet's defaults: containerLogMaxSize 10Mi, containerLogMaxFiles 5.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_FILES: usize = 5;

/// Output stream of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// When the log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the file has this many bytes; 0 = never.
    pub max_size: u64,
    /// Files kept per container attempt, the current one included (at least 1).
    pub max_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_size: DEFAULT_MAX_SIZE,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// What the copier was started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopierArgs {
    pub file: PathBuf,
    pub rotation: Rotation,
}

/// Parses `--cri-log FILE [--max-size BYTES] [--max-files N]` (pairs in any order).
/// Without rotation flags the file is never rotated (what older agents asked for).
pub fn parse_args(args: &[String]) -> Result<CopierArgs, String> {
    let mut file = None;
    let mut rotation = Rotation {
        max_size: 0,
        max_files: DEFAULT_MAX_FILES,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            COPIER_FLAG => file = Some(PathBuf::from(value)),
            MAX_SIZE_FLAG => {
                rotation.max_size = value
                    .parse()
                    .map_err(|_| format!("{MAX_SIZE_FLAG} {value:?}: not a byte count"))?
            }
            MAX_FILES_FLAG => {
                rotation.max_files = value
                    .parse::<usize>()
                    .map_err(|_| format!("{MAX_FILES_FLAG} {value:?}: not a number"))?
                    .max(1)
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    let file = file.ok_or_else(|| format!("{COPIER_FLAG} FILE is missing"))?;
    Ok(CopierArgs { file, rotation })
}

/// Days since 1970-01-01 -> (year, month, day) (proleptic Gregorian; H. Hinnant's
/// civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// UTC civil time of `t`: (year, month, day, hour, minute, second, nanos).
fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, mo, da) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400) as u32;
    (y, mo, da, s / 3600, s / 60 % 60, s % 60, d.subsec_nanos())
}

/// RFC3339Nano as Go writes it (trailing zeros of the fraction dropped), in UTC.
pub fn rfc3339_nano(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ns) = civil(t);
    let mut out = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
    if ns != 0 {
        let frac = format!("{ns:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Suffix of a rotated file: `YYYYMMDD-HHMMSS.nnnnnnnnn` (the kubelet's
/// `20060102-150405`, plus nanoseconds so that two rotations in one second do not
/// collide; names sort by time).
pub fn rotation_suffix(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ns) = civil(t);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}.{ns:09}")
}

/// One line of the file (with its newline), appended to `out`.
pub fn push_line(out: &mut Vec<u8>, time: &str, stream: Stream, partial: bool, message: &[u8]) {
    out.extend_from_slice(time.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(message);
    out.push(b'\n');
}

/// The rotated files of `file` (`<file>.<suffix>`), oldest first.
pub fn rotated_files(file: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
        return vec![];
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// The log file the copier appends to, rotated by size.
#[derive(Debug)]
pub struct Sink {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    rotation: Rotation,
}

impl Sink {
    /// Opens (creates, appends to) `path`; its directory is created when missing.
    pub fn open(path: &Path, rotation: Rotation) -> std::io::Result<Sink> {
        if let Some(d) = path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Sink {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            rotation,
        })
    }

    /// A sink that drops everything (the file could not be opened).
    pub fn none(path: &Path) -> Sink {
        Sink {
            path: path.to_path_buf(),
            file: None,
            size: 0,
            rotation: Rotation {
                max_size: 0,
                max_files: 1,
            },
        }
    }

    /// Appends whole lines; rotates when the file reached the size limit.
    pub fn write(&mut self, lines: &[u8]) {
        let Some(f) = self.file.as_mut() else { return };
        if f.write_all(lines).is_err() {
            return;
        }
        self.size += lines.len() as u64;
        if self.rotation.max_size > 0 && self.size >= self.rotation.max_size {
            self.rotate();
        }
    }

    /// `path` -> `path.<suffix>`, a new empty `path`, then the oldest rotated files removed
    /// beyond `max_files - 1`. On a failed rename the file keeps growing (and the next
    /// write tries again).
    pub fn rotate(&mut self) {
        let mut name = self.path.clone().into_os_string();
        name.push(".");
        name.push(rotation_suffix(SystemTime::now()));
        if let Err(e) = std::fs::rename(&self.path, &name) {
            eprintln!("skiff log copier: rotate {}: {e}", self.path.display());
            return;
        }
        match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            Ok(f) => {
                self.file = Some(f);
                self.size = 0;
            }
            Err(e) => {
                // Keep writing to the renamed file rather than losing output.
                eprintln!("skiff log copier: reopen {}: {e}", self.path.display());
            }
        }
        let rotated = rotated_files(&self.path);
        let keep = self.rotation.max_files.saturating_sub(1);
        for old in &rotated[..rotated.len().saturating_sub(keep)] {
            let _ = std::fs::remove_file(old);
        }
    }
}

/// The lines of one stream; output without a newline waits for more unless it reached
/// [`MAX_LINE`] (a P line) or the stream ended (an F line). Each read's lines are
/// stamped with the time of the read (what containerd's CRI plugin does).
pub fn copy_stream(mut r: impl Read, stream: Stream, sink: &Mutex<Sink>) {
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut chunk = vec![0u8; 32 * 1024];
    let write = |lines: &[u8]| {
        if let Ok(mut s) = sink.lock() {
            s.write(lines);
        }
    };
    let mut lines = Vec::with_capacity(chunk.len() + 256);
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let now = rfc3339_nano(SystemTime::now());
        lines.clear();
        let mut start = 0;
        loop {
            let rest = &buf[start..];
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) if i <= MAX_LINE => {
                    push_line(&mut lines, &now, stream, false, &rest[..i]);
                    start += i + 1;
                }
                _ if rest.len() >= MAX_LINE => {
                    push_line(&mut lines, &now, stream, true, &rest[..MAX_LINE]);
                    start += MAX_LINE;
                }
                _ => break,
            }
        }
        buf.drain(..start);
        if !lines.is_empty() {
            write(&lines);
        }
    }
    if !buf.is_empty() {
        lines.clear();
        push_line(
            &mut lines,
            &rfc3339_nano(SystemTime::now()),
            stream,
            false,
            &buf,
        );
        write(&lines);
    }
}

/// Copies `out` and `err` (the container's stdout and stderr pipes) into `args.file` as
/// CRI lines until both end; drops `ready` (the shim's ready pipe) once the file is open.
/// Returns the exit code.
pub fn run(args: &CopierArgs, out: File, err: File, ready: File) -> i32 {
    let sink = Sink::open(&args.file, args.rotation).unwrap_or_else(|e| {
        eprintln!("skiff log copier: {}: {e}", args.file.display());
        Sink::none(&args.file)
    });
    drop(ready);
    let sink = Mutex::new(sink);
    std::thread::scope(|s| {
        let sink = &sink;
        s.spawn(move || copy_stream(out, Stream::Stdout, sink));
        copy_stream(err, Stream::Stderr, sink);
    });
    0
}

/// The copier as the runc shim starts it: stdout and stderr pipes on fds 3 and 4, the
/// ready pipe's write end on fd 5.
pub fn run_from_shim(args: &CopierArgs) -> i32 {
    use std::os::fd::FromRawFd;
    // SAFETY: the runc shim starts the copier with exactly these descriptors open
    // (stdout and stderr read ends, the ready pipe's write end) and nothing else in this
    // process owns them.
    let (out, err, ready) = unsafe {
        (
            File::from_raw_fd(3),
            File::from_raw_fd(4),
            File::from_raw_fd(5),
        )
    };
    run(args, out, err, ready)
}
