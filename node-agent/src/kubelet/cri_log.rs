//! Container logs in the CRI layout and line format, as Kubernetes users find them:
//! `<pod-logs-dir>/<namespace>_<pod>_<uid>/<container>/<restartCount>.log` (pod-logs-dir
//! is `--pod-logs-dir`, default /var/log/pods), one line per output line:
//! `<RFC3339Nano timestamp> <stdout|stderr> <F|P> <message>` (P: a partial line, cut at
//! 16 KiB; the rest follows in the next line).
//!
//! Who writes: a small log copier per container, started by containerd's runc shim
//! through `binary://` task IO (the shim runs `skiff-cri-log --cri-log <file>
//! --max-size <bytes> --max-files <n>` with the container's stdout and stderr pipes as
//! fds 3 and 4 and a ready pipe as fd 5, which the copier closes once its file is open).
//! The copier ([`copier`], std only) is its own small binary next to `skiff-agent`;
//! when that is missing the agent binary itself serves (`skiff-agent --cri-log ...`,
//! slower to start, with a warning). The copier is the shim's child, not the
//! agent's, so logs keep flowing while the agent is stopped or restarted — the same
//! reason containerd's CRI plugin, not the kubelet, owns the log writer in Kubernetes.
//! The alternatives were weighed: the agent reading FIFOs loses (and, with full pipes,
//! blocks) output while it is down; `file://` IO to a raw file with conversion on read
//! has no per-line times (`--timestamps`, `--since-time` would be guesses) and no
//! stdout/stderr split. The copier stamps each line when it reads it (what containerd
//! does), rotates the file by size (`--container-log-max-size`,
//! `--container-log-max-files`; see [`copier`]) and ends when the container's pipes close.
//!
//! Who reads: the kubelet API's containerLogs ([`super::server`]) with [`parse_line`] and
//! [`LogFormatter`]: messages only, `timestamps` from the lines' own times, `sinceTime`
//! per line; the current file only (as the kubelet), a follow reopens the path after a
//! rotation.

pub mod copier;

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use chrono::{DateTime, SecondsFormat, Utc};

pub use copier::{COPIER_FLAG, MAX_LINE, Rotation, Stream};

/// The copier binary, installed next to `skiff-agent`.
pub const COPIER_BIN: &str = "skiff-cri-log";

/// One parsed line of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriLine<'a> {
    pub time: DateTime<Utc>,
    pub stream: Stream,
    /// P: the message continues in the next line.
    pub partial: bool,
    pub message: &'a [u8],
}

/// RFC3339Nano as Go writes it (trailing zeros of the fraction dropped).
pub fn rfc3339_nano(t: DateTime<Utc>) -> String {
    let s = t.to_rfc3339_opts(SecondsFormat::Nanos, true);
    match s.split_once('.') {
        Some((head, frac)) => {
            let frac = frac.trim_end_matches('Z').trim_end_matches('0');
            if frac.is_empty() {
                format!("{head}Z")
            } else {
                format!("{head}.{frac}Z")
            }
        }
        None => s,
    }
}

/// One line of the file (with its newline).
pub fn format_line(t: DateTime<Utc>, stream: Stream, partial: bool, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 48);
    out.extend_from_slice(rfc3339_nano(t).as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(message);
    out.push(b'\n');
    out
}

/// Parses one line (without its newline). None when it is not in the CRI format.
pub fn parse_line(line: &[u8]) -> Option<CriLine<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let ts = std::str::from_utf8(parts.next()?).ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"F" => false,
        b"P" => true,
        _ => return None,
    };
    let message = parts.next().unwrap_or_default();
    let time = DateTime::parse_from_rfc3339(ts).ok()?.with_timezone(&Utc);
    Some(CriLine {
        time,
        stream,
        partial,
        message,
    })
}

/// Turns CRI lines into what `kubectl logs` prints: the messages (P lines joined), each
/// output line prefixed with its time when `timestamps` (9 fraction digits, as the
/// kubelet's `timeFormatOut`), lines before `since` left out, at most `limit` bytes.
#[derive(Debug)]
pub struct LogFormatter {
    timestamps: bool,
    since: Option<DateTime<Utc>>,
    left: Option<u64>,
    at_line_start: bool,
    /// The end of a line not complete yet (follow reads).
    pending: Vec<u8>,
}

impl LogFormatter {
    pub fn new(timestamps: bool, since: Option<DateTime<Utc>>, limit: Option<u64>) -> Self {
        LogFormatter {
            timestamps,
            since,
            left: limit,
            at_line_start: true,
            pending: vec![],
        }
    }

    /// Formats the complete lines of `data` (an incomplete last line is kept for the next
    /// call). `fallback` is the time of lines that are not in the CRI format (raw logs of
    /// containers started by an older agent). Returns the output and whether the byte
    /// limit is reached.
    pub fn feed(&mut self, data: &[u8], fallback: DateTime<Utc>) -> (Vec<u8>, bool) {
        self.pending.extend_from_slice(data);
        let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return (vec![], false);
        };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        let mut out = Vec::with_capacity(complete.len());
        for line in complete[..complete.len() - 1].split(|b| *b == b'\n') {
            let parsed = parse_line(line).unwrap_or(CriLine {
                time: fallback,
                stream: Stream::Stdout,
                partial: false,
                message: line,
            });
            if self.since.is_some_and(|s| parsed.time < s) {
                continue;
            }
            if self.timestamps && self.at_line_start {
                out.extend_from_slice(
                    parsed
                        .time
                        .to_rfc3339_opts(SecondsFormat::Nanos, true)
                        .as_bytes(),
                );
                out.push(b' ');
            }
            out.extend_from_slice(parsed.message);
            if parsed.partial {
                self.at_line_start = false;
            } else {
                out.push(b'\n');
                self.at_line_start = true;
            }
        }
        if let Some(left) = &mut self.left {
            if out.len() as u64 >= *left {
                out.truncate(*left as usize);
                *left = 0;
                return (out, true);
            }
            *left -= out.len() as u64;
        }
        (out, false)
    }
}

// ------------------------------------------------------------------ the copier side

/// The `binary://` task IO URI that runs `exe` as the log copier of `file`.
pub fn copier_uri(exe: &Path, file: &Path, rotation: Rotation) -> String {
    fn enc(s: &str, keep_slash: bool) -> String {
        let mut o = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
                o.push(b as char);
            } else {
                o.push_str(&format!("%{b:02X}"));
            }
        }
        o
    }
    format!(
        "binary://{}?{}={}&{}={}&{}={}",
        enc(&exe.display().to_string(), true),
        COPIER_FLAG,
        enc(&file.display().to_string(), false),
        copier::MAX_SIZE_FLAG,
        rotation.max_size,
        copier::MAX_FILES_FLAG,
        rotation.max_files,
    )
}

/// The agent's own binary; a binary replaced on disk while the agent runs shows as
/// `<path> (deleted)`, the path then names the new one.
pub fn agent_exe() -> std::io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    let s = p.display().to_string();
    Ok(s.strip_suffix(" (deleted)").map(PathBuf::from).unwrap_or(p))
}

/// The program the shim runs as log copier: [`COPIER_BIN`] next to the agent's binary,
/// else (with one warning) the agent binary itself. Decided once per agent process.
pub fn copier_program() -> std::io::Result<PathBuf> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| {
            let exe = agent_exe().map_err(|e| format!("own binary: {e}"))?;
            let copier = exe.with_file_name(COPIER_BIN);
            if copier.is_file() {
                return Ok(copier);
            }
            tracing::warn!(
                "log copier {} is missing (build it with `cargo build -p skiff-agent --bins`, \
                 install it next to skiff-agent): containers log through `{} {COPIER_FLAG}`, \
                 which starts slower",
                copier.display(),
                exe.display()
            );
            Ok(exe)
        })
        .clone()
        .map_err(std::io::Error::other)
}

/// If this process was started as a log copier (`<binary> --cri-log <file> ...`), runs
/// it and returns its exit code.
pub fn copier_from_args() -> Option<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().step_by(2).any(|a| a == COPIER_FLAG) {
        return None;
    }
    Some(match copier::parse_args(&args) {
        Ok(a) => copier::run_from_shim(&a),
        Err(e) => {
            eprintln!("skiff log copier: {e}");
            2
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn format_and_parse() {
        let ts = t("2026-11-25T23:01:21.120000000Z");
        assert_eq!(rfc3339_nano(ts), "2026-11-25T23:01:21.12Z");
        assert_eq!(
            rfc3339_nano(t("2026-11-25T23:01:21Z")),
            "2026-11-25T23:01:21Z"
        );
        let l = format_line(ts, Stream::Stderr, false, b"hello world");
        assert_eq!(l, b"2026-11-25T23:01:21.12Z stderr F hello world\n");
        let p = parse_line(&l[..l.len() - 1]).unwrap();
        assert_eq!(p.time, ts);
        assert_eq!(p.stream, Stream::Stderr);
        assert!(!p.partial);
        assert_eq!(p.message, b"hello world");
        let p = parse_line(b"2016-10-06T00:17:09.669794202Z stdout P part ").unwrap();
        assert!(p.partial);
        assert_eq!(p.message, b"part ");
        assert_eq!(p.time.timestamp_subsec_nanos(), 669794202);
        let p = parse_line(b"2016-10-06T00:17:09+02:00 stdout F ").unwrap();
        assert_eq!(p.message, b"");
        assert_eq!(p.time, t("2016-10-05T22:17:09Z"));
        for bad in [
            &b"hello"[..],
            b"2016-10-06T00:17:09Z stdin F x",
            b"2016-10-06T00:17:09Z stdout X x",
            b"yesterday stdout F x",
            b"",
        ] {
            assert!(parse_line(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn formatter_joins_partials_filters_and_limits() {
        let data = b"2026-01-01T00:00:01Z stdout F one\n\
            2026-01-01T00:00:02.5Z stderr P tw\n\
            2026-01-01T00:00:02.6Z stderr F o\n\
            2026-01-01T00:00:03Z stdout F three\n";
        let fb = t("2030-01-01T00:00:00Z");
        let (o, done) = LogFormatter::new(false, None, None).feed(data, fb);
        assert_eq!(String::from_utf8(o).unwrap(), "one\ntwo\nthree\n");
        assert!(!done);
        let (o, _) = LogFormatter::new(true, None, None).feed(data, fb);
        assert_eq!(
            String::from_utf8(o).unwrap(),
            "2026-01-01T00:00:01.000000000Z one\n\
             2026-01-01T00:00:02.500000000Z two\n\
             2026-01-01T00:00:03.000000000Z three\n"
        );
        let (o, _) = LogFormatter::new(false, Some(t("2026-01-01T00:00:02Z")), None).feed(data, fb);
        assert_eq!(String::from_utf8(o).unwrap(), "two\nthree\n");
        let (o, done) = LogFormatter::new(false, None, Some(6)).feed(data, fb);
        assert_eq!(String::from_utf8(o).unwrap(), "one\ntw");
        assert!(done);
        // Split across reads; raw lines (older agents) pass through with the fallback time.
        let mut f = LogFormatter::new(true, None, None);
        assert!(f.feed(b"2026-01-01T00:00:01Z stdout F o", fb).0.is_empty());
        let (o, _) = f.feed(b"ne\nraw text\n", fb);
        assert_eq!(
            String::from_utf8(o).unwrap(),
            "2026-01-01T00:00:01.000000000Z one\n2030-01-01T00:00:00.000000000Z raw text\n"
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("skiff-cri-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_lines(text: &[u8]) -> Vec<CriLine<'_>> {
        text.strip_suffix(b"\n")
            .unwrap_or(text)
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_line(l).expect("CRI line"))
            .collect()
    }

    #[test]
    fn copier_lines() {
        let dir = temp_dir("lines");
        let path = dir.join("0.log");
        let sink = Mutex::new(copier::Sink::open(&path, Rotation::default()).unwrap());
        let long = vec![b'x'; MAX_LINE + 10];
        let mut input = b"a\nbc\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nend-without-newline");
        copier::copy_stream(&input[..], Stream::Stdout, &sink);
        drop(sink);
        let text = std::fs::read(&path).unwrap();
        let lines = read_lines(&text);
        let msgs: Vec<(bool, usize)> = lines.iter().map(|l| (l.partial, l.message.len())).collect();
        assert_eq!(
            msgs,
            vec![
                (false, 1),
                (false, 2),
                (true, MAX_LINE),
                (false, 10),
                (false, 19)
            ]
        );
        assert!(lines.iter().all(|l| l.stream == Stream::Stdout));
        let (o, _) = LogFormatter::new(false, None, None).feed(&text, Utc::now());
        assert_eq!(o.len(), input.len() + 1);
        std::fs::remove_dir_all(&dir).unwrap();
        let uri = copier_uri(
            Path::new("/usr/bin/skiff agent"),
            Path::new("/var/log/pods/a_b c/0.log"),
            Rotation::default(),
        );
        assert_eq!(
            uri,
            "binary:///usr/bin/skiff%20agent?--cri-log=%2Fvar%2Flog%2Fpods%2Fa_b%20c%2F0.log\
             &--max-size=10485760&--max-files=5"
        );
    }

    #[test]
    fn copier_time_format_matches_chrono() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        for (secs, nanos) in [
            (0u64, 0u32),
            (951_782_400, 1), // 2000-02-29
            (1_798_761_599, 999_999_999),
            (1_795_734_081, 120_000_000),
            (4_102_444_800, 500),         // 2100-01-01
            (1_709_164_800, 669_794_202), // 2024-02-29
        ] {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            let c: DateTime<Utc> = t.into();
            assert_eq!(copier::rfc3339_nano(t), rfc3339_nano(c), "{secs}.{nanos}");
            assert_eq!(
                copier::rotation_suffix(t),
                c.format("%Y%m%d-%H%M%S.%9f").to_string()
            );
        }
        let now = SystemTime::now();
        assert_eq!(copier::rfc3339_nano(now), rfc3339_nano(now.into()));
    }

    #[test]
    fn copier_args() {
        let a =
            |v: &[&str]| copier::parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // containerd passes the URI query as a Go map: any order.
        let p = a(&[
            "--max-files",
            "3",
            "--cri-log",
            "/l/0.log",
            "--max-size",
            "100",
        ])
        .unwrap();
        assert_eq!(p.file, PathBuf::from("/l/0.log"));
        assert_eq!(
            p.rotation,
            Rotation {
                max_size: 100,
                max_files: 3
            }
        );
        // Older agents: the file only, never rotated.
        assert_eq!(a(&["--cri-log", "/l/0.log"]).unwrap().rotation.max_size, 0);
        assert!(a(&["--max-size", "1"]).is_err());
        assert!(a(&["--cri-log"]).is_err());
        assert!(a(&["--cri-log", "f", "--bogus", "1"]).is_err());
        assert!(a(&["--cri-log", "f", "--max-size", "10Mi"]).is_err());
    }

    /// More than max-size through the copier: the file rotates, at most max-files stay,
    /// nothing is lost in between, the current file holds the newest lines and reads as a
    /// log on its own.
    #[test]
    fn copier_rotates_by_size() {
        let dir = temp_dir("rotate");
        let path = dir.join("0.log");
        // An older attempt's files are left alone.
        std::fs::write(dir.join("10.log"), b"").unwrap();
        std::fs::write(dir.join("10.log.20200101-000000.000000000"), b"").unwrap();
        let rotation = Rotation {
            max_size: 4096,
            max_files: 3,
        };
        let sink = Mutex::new(copier::Sink::open(&path, rotation).unwrap());
        // 1000 lines of ~60 bytes (with the CRI prefix), in reads of 7 lines, through a
        // pipe-like reader that hands out small chunks.
        struct Chunks(Vec<Vec<u8>>);
        impl std::io::Read for Chunks {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let Some(c) = self.0.first_mut() else {
                    return Ok(0);
                };
                let n = c.len().min(buf.len());
                buf[..n].copy_from_slice(&c[..n]);
                c.drain(..n);
                if c.is_empty() {
                    self.0.remove(0);
                }
                Ok(n)
            }
        }
        let all: Vec<String> = (0..1000).map(|i| format!("line {i:05}")).collect();
        let chunks = all
            .chunks(7)
            .map(|c| {
                c.iter()
                    .flat_map(|l| format!("{l}\n").into_bytes())
                    .collect()
            })
            .collect();
        copier::copy_stream(Chunks(chunks), Stream::Stdout, &sink);
        drop(sink);
        let rotated = copier::rotated_files(&path);
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        assert!(dir.join("10.log.20200101-000000.000000000").exists());
        // Every file holds whole lines and stays around max-size.
        let mut kept = vec![];
        for f in rotated.iter().chain([&path]) {
            let text = std::fs::read(f).unwrap();
            assert!(text.len() < 4096 + 1024, "{}: {}", f.display(), text.len());
            kept.extend(
                read_lines(&text)
                    .iter()
                    .map(|l| String::from_utf8(l.message.to_vec()).unwrap()),
            );
        }
        // What is kept is the newest part of the output, in order, without gaps.
        assert!(kept.len() > 100, "{}", kept.len());
        assert_eq!(kept[..], all[all.len() - kept.len()..]);
        // The current file reads on its own (what kubectl logs shows).
        let current = std::fs::read(&path).unwrap();
        let (o, _) = LogFormatter::new(false, None, None).feed(&current, Utc::now());
        let shown = String::from_utf8(o).unwrap();
        assert!(shown.ends_with("line 00999\n"), "{shown}");
        // The copier reopened after rotating: a second copier appends to the same file.
        let before = current.len();
        let sink = Mutex::new(copier::Sink::open(&path, rotation).unwrap());
        copier::copy_stream(&b"more\n"[..], Stream::Stderr, &sink);
        assert!(std::fs::read(&path).unwrap().len() > before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
