//! Soak benchmark (issue 10): many messages over many concurrent connections, then
//! checks that nothing leaked and every message was stored exactly once.
//!
//! ```text
//! cargo run --release --example soak -- [--messages N] [--conns C] [--size BYTES]
//!     [--no-fsync] [--rss-bound-mib M] [--keep]
//! cargo run --release --example soak -- --addr 127.0.0.1:2525 --spool DIR [--pid PID] ...
//! ```
//!
//! Defaults: 100,000 messages of about 1 KiB over 64 connections, fsync on. Without
//! `--addr` the server runs in this process (64 workers, a temporary spool), and the
//! file descriptors and RSS are this process's own; with `--addr` the load goes to a
//! running server, `--spool` names its spool directory (to check the stored files) and
//! `--pid` its process (to check descriptors and RSS through `/proc/PID`).
//!
//! Each connection sends its share of the messages one after another, pipelining
//! MAIL, RCPT and DATA (RFC 2920), and each message carries a unique `X-Soak-Id`.
//! Afterwards it asserts (exit code 1 when one fails):
//! - every message got `250 … queued as ID`, with no ID twice;
//! - `new/` holds exactly one file per message and each id appears exactly once;
//! - descriptors: back to the count before the load once the sessions have closed, and
//!   in-process back to the count before the server started once it has stopped;
//! - RSS grew by less than `--rss-bound-mib` (default 16 MiB) from the end of a warm-up
//!   (the first 10 % of the messages) to the end.
//!
//! Loopback only: the address must be on this machine.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    messages: u64,
    conns: u64,
    size: usize,
    fsync: bool,
    rss_bound_mib: u64,
    keep: bool,
    addr: Option<SocketAddr>,
    spool: Option<PathBuf>,
    pid: Option<u32>,
}

fn usage(why: &str) -> ! {
    eprintln!("soak: {why}");
    eprintln!(
        "usage: soak [--messages N] [--conns C] [--size BYTES] [--no-fsync] [--rss-bound-mib M] [--keep]\n\
         \x20      soak --addr HOST:PORT --spool DIR [--pid PID] [--messages N] [--conns C] [--size BYTES]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        messages: 100_000,
        conns: 64,
        size: 1024,
        fsync: true,
        rss_bound_mib: 16,
        keep: false,
        addr: None,
        spool: None,
        pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("bad number {v:?}")))
        };
        match flag.as_str() {
            "--messages" => a.messages = num(value()),
            "--conns" => a.conns = num(value()),
            "--size" => a.size = num(value()) as usize,
            "--rss-bound-mib" => a.rss_bound_mib = num(value()),
            "--no-fsync" => a.fsync = false,
            "--keep" => a.keep = true,
            "--addr" => {
                let v = value();
                let addr: SocketAddr = v
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("bad address {v:?}")));
                if !addr.ip().is_loopback() {
                    usage("the soak test only sends to loopback addresses");
                }
                a.addr = Some(addr);
            }
            "--spool" => a.spool = Some(PathBuf::from(value())),
            "--pid" => a.pid = Some(num(value()) as u32),
            "--help" | "-h" => usage("help"),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if a.messages == 0 || a.conns == 0 {
        usage("--messages and --conns must be positive");
    }
    if a.addr.is_some() && a.spool.is_none() {
        usage("--addr needs --spool (to check what was stored)");
    }
    a
}

/// `/proc/<pid>` of the process under test.
fn proc_dir(pid: Option<u32>) -> PathBuf {
    match pid {
        Some(p) => PathBuf::from(format!("/proc/{p}")),
        None => PathBuf::from("/proc/self"),
    }
}

fn fd_count(pid: Option<u32>) -> usize {
    std::fs::read_dir(proc_dir(pid).join("fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// VmRSS in KiB.
fn rss_kib(pid: Option<u32>) -> u64 {
    std::fs::read_to_string(proc_dir(pid).join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Reads one reply; returns its last line.
fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let reply = mailer::client::read_reply(r)?;
    Ok(reply.lines.last().map_or("", |l| l.trim_end()).to_string())
}

fn expect(r: &mut BufReader<TcpStream>, code: &str) -> Result<String, String> {
    let l = reply(r).map_err(|e| e.to_string())?;
    if l.starts_with(code) {
        Ok(l)
    } else {
        Err(format!("expected {code}, got {l:?}"))
    }
}

/// What every connection adds to.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    /// A 64-bit hash of each queue id (fixed size, so the bookkeeping of the load
    /// itself hardly moves the RSS figure).
    ids: Mutex<Vec<u64>>,
    /// Microseconds from MAIL to the final 250, per message.
    latencies: Mutex<Vec<u32>>,
}

/// One connection's share: messages `first, first + step, …` below `total`.
struct Share {
    addr: SocketAddr,
    first: u64,
    step: u64,
    total: u64,
    size: usize,
}

fn client(share: Share, tally: &Tally) -> Result<(), String> {
    let Share {
        addr,
        first,
        step,
        total,
        size,
    } = share;
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut w = tcp.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(tcp);
    expect(&mut r, "220 ")?;
    w.write_all(b"EHLO soak.test\r\n")
        .map_err(|e| e.to_string())?;
    expect(&mut r, "250 ")?;
    let filler: String =
        "soak line of filler text, sixty-four octets long...........\r\n".repeat(size / 64 + 1);
    let share_len = (total.saturating_sub(first)).div_ceil(step) as usize;
    let mut my_ids = Vec::with_capacity(share_len);
    let mut my_lat = Vec::with_capacity(share_len);
    let mut n = first;
    while n < total {
        let began = Instant::now();
        w.write_all(b"MAIL FROM:<soak@x.test>\r\nRCPT TO:<sink@y.test>\r\nDATA\r\n")
            .map_err(|e| e.to_string())?;
        expect(&mut r, "250 ")?;
        expect(&mut r, "250 ")?;
        expect(&mut r, "354 ")?;
        let body = format!(
            "Subject: soak {n}\r\nX-Soak-Id: {n}\r\n\r\n{}\r\n.\r\n",
            &filler[..size.min(filler.len())]
        );
        w.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
        let ok = expect(&mut r, "250 ")?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ok.rsplit(' ').next().unwrap_or("").hash(&mut h);
        my_ids.push(h.finish());
        my_lat.push(began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        tally.done.fetch_add(1, Ordering::Relaxed);
        n += step;
    }
    w.write_all(b"QUIT\r\n").map_err(|e| e.to_string())?;
    expect(&mut r, "221 ")?;
    tally.ids.lock().unwrap().extend(my_ids);
    tally.latencies.lock().unwrap().extend(my_lat);
    Ok(())
}

/// Checks `new/`: one file per message, each `X-Soak-Id` once. Returns problems.
fn check_spool(spool: &Path, total: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let entries: Vec<_> = match std::fs::read_dir(spool.join("new")) {
        Ok(d) => d.filter_map(|e| e.ok()).collect(),
        Err(e) => return vec![format!("cannot read {}/new: {e}", spool.display())],
    };
    if entries.len() as u64 != total {
        problems.push(format!(
            "{} files in new/, {total} messages sent",
            entries.len()
        ));
    }
    let mut seen = vec![0u32; total as usize];
    for e in &entries {
        let Ok(bytes) = std::fs::read(e.path()) else {
            problems.push(format!("cannot read {:?}", e.path()));
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Soak-Id: "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        match id {
            Some(i) if i < total => seen[i as usize] += 1,
            _ => problems.push(format!("{:?} has no valid X-Soak-Id", e.file_name())),
        }
    }
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let doubled = seen.iter().filter(|&&c| c > 1).count();
    if missing > 0 || doubled > 0 {
        problems.push(format!(
            "{missing} message(s) missing, {doubled} stored more than once"
        ));
    }
    if let Ok(tmp) = std::fs::read_dir(spool.join("tmp")) {
        let left = tmp.count();
        if left > 0 {
            problems.push(format!("{left} file(s) left in tmp/"));
        }
    }
    problems
}

fn main() {
    let args = parse_args();
    let mut problems: Vec<String> = Vec::new();
    let fd_before_server = fd_count(None);

    // The server: in this process, or the one at --addr.
    let mut tempdir = None;
    let mut server = None;
    let (addr, spool, pid) = match args.addr {
        Some(addr) => (addr, args.spool.clone().expect("checked"), args.pid),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("mailer-soak")
                .tempdir()
                .expect("temp dir");
            let spool = args
                .spool
                .clone()
                .unwrap_or_else(|| dir.path().join("spool"));
            tempdir = Some(dir);
            let mut cfg = mailer::Config {
                hostname: "soak.test".into(),
                ..mailer::Config::default()
            };
            cfg.server.listen = vec!["127.0.0.1:0".into()];
            cfg.server.workers = args.conns as usize;
            cfg.server.max_connections_per_ip = args.conns as usize + 8;
            cfg.server.stats_interval_secs = 0;
            cfg.spool.dir = spool.clone();
            cfg.spool.fsync = args.fsync;
            let s = mailer::Server::builder(cfg).build().expect("server builds");
            let handle = s.handle();
            let addr = handle.local_addrs()[0];
            let thread = std::thread::spawn(move || s.run().expect("server runs"));
            server = Some((handle, thread));
            (addr, spool, None)
        }
    };
    let target = if pid.is_none() && args.addr.is_some() {
        None // nothing to measure: unknown server process
    } else {
        Some(pid)
    };

    // Wait until the server answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "server at {addr} not reachable");
        std::thread::sleep(Duration::from_millis(20));
    }
    // That probe connection may still be open on the server side for a moment.
    std::thread::sleep(Duration::from_millis(300));
    let fd_before_load = target.map(fd_count);

    println!(
        "soak: {} messages of ~{} bytes over {} connections to {addr} (fsync {}, spool {})",
        args.messages,
        args.size,
        args.conns,
        match (args.addr, args.fsync) {
            (Some(_), _) => "as the server is configured",
            (None, true) => "on",
            (None, false) => "off",
        },
        spool.display()
    );

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let workers: Vec<_> = (0..args.conns)
        .map(|i| {
            let tally = Arc::clone(&tally);
            let share = Share {
                addr,
                first: i,
                step: args.conns,
                total: args.messages,
                size: args.size,
            };
            std::thread::Builder::new()
                .name(format!("soak-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || client(share, &tally))
                .expect("thread")
        })
        .collect();

    // Progress, and RSS once the warm-up (10 %) is over.
    let warm_at = (args.messages / 10).max(1);
    let mut rss_warm = None;
    let mut last_print = Instant::now();
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        let d = tally.done.load(Ordering::Relaxed);
        if rss_warm.is_none() && d >= warm_at {
            rss_warm = target.map(rss_kib);
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!("  {d} / {} after {:.0?}", args.messages, started.elapsed());
            last_print = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    for (i, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("connection {i}: {e}")),
            Err(_) => problems.push(format!("connection {i}: panicked")),
        }
    }
    let rss_end = target.map(rss_kib);
    let sent = tally.done.load(Ordering::Relaxed);
    let mb = sent as f64 * (args.size as f64 + 60.0) / 1e6;
    println!(
        "soak: {sent} messages in {:.2} s: {:.0} messages/s, {:.1} MB/s",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        mb / elapsed.as_secs_f64()
    );
    let mut lat = tally.latencies.lock().unwrap().clone();
    lat.sort();
    if !lat.is_empty() {
        let ms = |us: u32| f64::from(us) / 1000.0;
        let pct = |p: f64| ms(lat[((lat.len() - 1) as f64 * p) as usize]);
        println!(
            "soak: latency per message (MAIL to 250): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(0.5),
            pct(0.99),
            ms(lat[lat.len() - 1])
        );
    }

    // Every 250 named a distinct queue id.
    let ids = tally.ids.lock().unwrap().clone();
    let unique: HashSet<&u64> = ids.iter().collect();
    if ids.len() as u64 != args.messages || unique.len() != ids.len() {
        problems.push(format!(
            "{} queued-as replies, {} distinct, {} messages",
            ids.len(),
            unique.len(),
            args.messages
        ));
    }

    // Descriptors: back to the count before the load once every session has closed.
    if let (Some(t), Some(before)) = (target, fd_before_load) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut now = fd_count(t);
        while now > before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = fd_count(t);
        }
        println!("soak: descriptors before the load {before}, after {now}");
        if now > before {
            problems.push(format!(
                "{} descriptor(s) leaked ({before} -> {now})",
                now - before
            ));
        }
    }
    if let (Some(warm), Some(end)) = (rss_warm, rss_end) {
        let growth = end.saturating_sub(warm);
        println!(
            "soak: RSS {} MiB after warm-up, {} MiB at the end (growth {} KiB, bound {} MiB)",
            warm / 1024,
            end / 1024,
            growth,
            args.rss_bound_mib
        );
        if growth > args.rss_bound_mib * 1024 {
            problems.push(format!("RSS grew by {growth} KiB"));
        }
    }

    // Stop the in-process server (drains the spool writer) and check descriptors again.
    if let Some((handle, thread)) = server.take() {
        handle.shutdown();
        let _ = thread.join();
        let after = fd_count(None);
        println!(
            "soak: descriptors before the server {fd_before_server}, after it stopped {after}"
        );
        if after > fd_before_server {
            problems.push(format!(
                "server left {} descriptor(s) open",
                after - fd_before_server
            ));
        }
    }

    let checked = Instant::now();
    problems.extend(check_spool(&spool, args.messages));
    println!(
        "soak: checked {} stored files in {:.1} s",
        args.messages,
        checked.elapsed().as_secs_f64()
    );
    if args.keep {
        if let Some(dir) = tempdir.take() {
            let _ = dir.keep();
        }
        println!("soak: spool kept at {}", spool.display());
    }
    if problems.is_empty() {
        println!("soak: OK");
    } else {
        for p in &problems {
            eprintln!("soak: FAILED: {p}");
        }
        std::process::exit(1);
    }
}
