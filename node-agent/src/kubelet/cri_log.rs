//! Container logs in the CRI layout and line format, as Kubernetes users find them:
//! `<pod-logs-dir>/<namespace>_<pod>_<uid>/<container>/<restartCount>.log` (pod-logs-dir
//! is `--pod-logs-dir`, default /var/log/pods), one line per output line:
//! `<RFC3339Nano timestamp> <stdout|stderr> <F|P> <message>` (P: a partial line, cut at
//! 16 KiB; the rest follows in the next line).
//!
//! Who writes: a small log copier per container, started by containerd's runc shim
//! through `binary://` task IO (the shim runs `<agent binary> --cri-log <file>` with the
//! container's stdout and stderr pipes as fds 3 and 4 and a ready pipe as fd 5, which the
//! copier closes once its file is open). The copier is the shim's child, not the
//! agent's, so logs keep flowing while the agent is stopped or restarted — the same
//! reason containerd's CRI plugin, not the kubelet, owns the log writer in Kubernetes.
//! The alternatives were weighed: the agent reading FIFOs loses (and, with full pipes,
//! blocks) output while it is down; `file://` IO to a raw file with conversion on read
//! has no per-line times (`--timestamps`, `--since-time` would be guesses) and no
//! stdout/stderr split. The copier stamps each line when it reads it (what containerd
//! does) and ends when the container's pipes close.
//!
//! Who reads: the kubelet API's containerLogs ([`super::server`]) with [`parse_line`] and
//! [`LogFormatter`]: messages only, `timestamps` from the lines' own times, `sinceTime`
//! per line.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::FromRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use chrono::{DateTime, SecondsFormat, Utc};

/// The argument that makes the agent binary a log copier.
pub const COPIER_FLAG: &str = "--cri-log";

/// Longest message of one line; longer output lines are split into P lines.
pub const MAX_LINE: usize = 16 * 1024;

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
pub fn copier_uri(exe: &Path, file: &Path) -> String {
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
        "binary://{}?{}={}",
        enc(&exe.display().to_string(), true),
        COPIER_FLAG,
        enc(&file.display().to_string(), false)
    )
}

/// The agent's own binary (for [`copier_uri`]); a binary replaced on disk while the
/// agent runs shows as `<path> (deleted)`, the path then names the new one.
pub fn agent_exe() -> std::io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    let s = p.display().to_string();
    Ok(s.strip_suffix(" (deleted)").map(PathBuf::from).unwrap_or(p))
}

/// If this process was started as a log copier (`<binary> --cri-log <file>`), runs it
/// and returns its exit code.
pub fn copier_from_args() -> Option<i32> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == COPIER_FLAG {
        return Some(run_copier(Path::new(&args[2])));
    }
    None
}

/// Copies the shim's stdout (fd 3) and stderr (fd 4) pipes into `file` as CRI lines
/// until both end; closes the ready pipe (fd 5) once the file is open.
pub fn run_copier(file: &Path) -> i32 {
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
    if let Some(d) = file.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let sink: Option<File> = OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .inspect_err(|e| eprintln!("skiff log copier: {}: {e}", file.display()))
        .ok();
    drop(ready);
    let sink = Arc::new(Mutex::new(sink));
    let threads: Vec<_> = [(out, Stream::Stdout), (err, Stream::Stderr)]
        .into_iter()
        .map(|(r, stream)| {
            let sink = sink.clone();
            std::thread::spawn(move || copy_stream(r, stream, &sink))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    0
}

/// The lines of one stream; output without a newline waits for more unless it reached
/// [`MAX_LINE`] (a P line) or the stream ended (an F line).
pub fn copy_stream(mut r: impl Read, stream: Stream, sink: &Mutex<Option<File>>) {
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut chunk = vec![0u8; 32 * 1024];
    let write = |lines: &[u8]| {
        if let Ok(mut g) = sink.lock()
            && let Some(f) = g.as_mut()
        {
            let _ = f.write_all(lines);
        }
    };
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let now = Utc::now();
        let mut lines = Vec::new();
        let mut start = 0;
        loop {
            let rest = &buf[start..];
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) if i <= MAX_LINE => {
                    lines.extend(format_line(now, stream, false, &rest[..i]));
                    start += i + 1;
                }
                _ if rest.len() >= MAX_LINE => {
                    lines.extend(format_line(now, stream, true, &rest[..MAX_LINE]));
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
        write(&format_line(Utc::now(), stream, false, &buf));
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn copier_lines() {
        let dir = std::env::temp_dir().join(format!("skiff-cri-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("0.log");
        let sink = Mutex::new(Some(File::create(&path).unwrap()));
        let long = vec![b'x'; MAX_LINE + 10];
        let mut input = b"a\nbc\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nend-without-newline");
        copy_stream(&input[..], Stream::Stdout, &sink);
        drop(sink);
        let text = std::fs::read(&path).unwrap();
        let lines: Vec<CriLine> = text
            .strip_suffix(b"\n")
            .unwrap()
            .split(|b| *b == b'\n')
            .map(|l| parse_line(l).expect("CRI line"))
            .collect();
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
        );
        assert_eq!(
            uri,
            "binary:///usr/bin/skiff%20agent?--cri-log=%2Fvar%2Flog%2Fpods%2Fa_b%20c%2F0.log"
        );
    }
}
