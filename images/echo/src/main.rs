//! skiff-echo: the sample workload's server (image `skiff/echo`, binary `/echo`).
//!
//! Listens on `0.0.0.0:$PORT` (default 8080) for both TCP and UDP:
//! - HTTP/1.1: every request is answered `200 OK` with the body `<pod name> <request path>\n`
//!   (keep-alive honoured, one thread per connection);
//! - UDP: every datagram is answered with `<pod name> <payload>`.
//!
//! The pod name is `$POD_NAME`, else the hostname (the kubelet sets it to the pod's name).
//!
//! Client modes (for tests from inside pods, where busybox has no UDP client):
//! - `echo udp HOST:PORT MESSAGE [COUNT]`: sends MESSAGE COUNT times (default 1) from one
//!   unconnected socket, prints each reply as `<reply> from <source address>`;
//! - `echo tcp HOST:PORT PATH [COUNT]`: COUNT HTTP GETs (a new connection each), prints
//!   each response body and the connected socket's peer address (`getpeername`).
//!
//! std only, so it links statically (`cargo xtask images` builds it for
//! x86_64-unknown-linux-musl) and runs in an empty rootfs.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Arc,
    thread,
    time::Duration,
};

/// Requests larger than this (request line plus headers) are refused.
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies are read and discarded up to this size.
const MAX_BODY: u64 = 16 * 1024 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 4 && (args[1] == "udp" || args[1] == "tcp") {
        let count: usize = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(1);
        let ok = if args[1] == "udp" {
            udp_client(&args[2], &args[3], count)
        } else {
            tcp_client(&args[2], &args[3], count)
        };
        std::process::exit(if ok { 0 } else { 1 });
    }
    exit_on_term();
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.trim().parse().unwrap_or_else(|_| {
            eprintln!("skiff-echo: PORT={p:?} is not a port number");
            std::process::exit(2);
        }),
        Err(_) => 8080,
    };
    let name: Arc<str> = pod_name().into();
    let tcp = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("skiff-echo: tcp bind 0.0.0.0:{port}: {e}");
        std::process::exit(1);
    });
    let udp = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("skiff-echo: udp bind 0.0.0.0:{port}: {e}");
        std::process::exit(1);
    });
    println!("skiff-echo {name} listening on :{port} (tcp http, udp)");
    let udp_name = name.clone();
    thread::spawn(move || serve_udp(udp, &udp_name));
    for conn in tcp.incoming() {
        match conn {
            Ok(stream) => {
                let name = name.clone();
                if let Err(e) = thread::Builder::new().spawn(move || {
                    let _ = serve_http(stream, &name);
                }) {
                    eprintln!("skiff-echo: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("skiff-echo: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// As a container's pid 1 the default SIGTERM action does not apply (the kernel ignores
/// signals without a handler for a pid namespace's init), so `kubectl delete` would wait
/// for the whole grace period: exit at once on SIGTERM and SIGINT instead.
fn exit_on_term() {
    unsafe extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }
    extern "C" fn on_term(_: i32) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { _exit(0) }
    }
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    // SAFETY: installs a handler that only calls _exit.
    unsafe {
        signal(SIGTERM, on_term);
        signal(SIGINT, on_term);
    }
}

/// `$POD_NAME`, else the kernel hostname, else "unknown".
fn pod_name() -> String {
    if let Ok(n) = std::env::var("POD_NAME")
        && !n.trim().is_empty()
    {
        return n.trim().to_string();
    }
    for f in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(n) = std::fs::read_to_string(f)
            && !n.trim().is_empty()
        {
            return n.trim().to_string();
        }
    }
    "unknown".into()
}

fn serve_udp(sock: UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = Vec::with_capacity(name.len() + 1 + n);
                reply.extend_from_slice(name.as_bytes());
                reply.push(b' ');
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
            Err(e) => {
                eprintln!("skiff-echo: udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Serves one connection: requests until the client closes, asks to close, or idles 60 s.
fn serve_http(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue; // tolerated blank lines between requests
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("/").to_string();
        let version = parts.next().unwrap_or("HTTP/1.0").to_string();
        // Headers.
        let mut head = line.len();
        let mut content_length: u64 = 0;
        let mut close = version != "HTTP/1.1";
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            head += h.len();
            if head > MAX_HEAD {
                writer.write_all(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )?;
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") {
                    if v.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if v.eq_ignore_ascii_case("keep-alive") {
                        close = false;
                    }
                }
            }
        }
        if content_length > MAX_BODY {
            writer.write_all(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        std::io::copy(
            &mut (&mut reader).take(content_length),
            &mut std::io::sink(),
        )?;
        let body = format!("{name} {path}\n");
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if method != "HEAD" {
            resp.push_str(&body);
        }
        writer.write_all(resp.as_bytes())?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// `echo udp`: one unconnected socket, COUNT request/reply exchanges (2 s timeout each).
fn udp_client(addr: &str, msg: &str, count: usize) -> bool {
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        eprintln!("skiff-echo: udp bind failed");
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
    let mut ok = true;
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        if let Err(e) = sock.send_to(msg.as_bytes(), addr) {
            eprintln!("skiff-echo: send to {addr}: {e}");
            ok = false;
            continue;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => println!("{} from {from}", String::from_utf8_lossy(&buf[..n]).trim()),
            Err(e) => {
                eprintln!("skiff-echo: no reply from {addr}: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// `echo tcp`: COUNT HTTP/1.0 GETs of PATH, each on a new connection.
fn tcp_client(addr: &str, path: &str, count: usize) -> bool {
    let mut ok = true;
    for _ in 0..count {
        let r = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let peer = s.peer_addr()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            let body = out
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string();
            Ok(format!("{body} peer {peer}"))
        })();
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("skiff-echo: {addr}: {e}");
                ok = false;
            }
        }
    }
    ok
}
