//! The spool alone, without SMTP (issue 18): `--threads` writers each store messages of
//! `--size` bytes through `mailer::spool::Maildir` exactly as sessions do (create in
//! tmp/, write, data sync, hand to the writer thread, which renames into new/ and fsyncs
//! new/ once per batch), for `--secs` seconds. Compares the data-sync modes on one disk,
//! and says how much CPU the whole machine spent per message (`cpu_us_per_msg`, from
//! /proc/stat, iowait counted as idle): with the same figure for smtp-sink from
//! `bench/compare.sh`, what a 2-core box can do for SMTP plus storage at most.
//!
//! ```text
//! cargo run --release --example spoolbench -- --dir /var/tmp/sb --threads 32 --size 4096 --secs 5 --mode file
//! cargo run --release --example spoolbench -- --dir /var/tmp/sb --threads 32 --size 4096 --secs 5 --mode batch
//! ```
//! Prints one JSON line. The directory is emptied of the messages it stored afterwards,
//! unless `--keep` (on ext4, creating files right after thousands were deleted is slow,
//! which would handicap the next run; see bench/README.md).

use mailer::spool::{DataSync, Maildir, SpoolOptions, Store};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let mut dir = PathBuf::from("spoolbench");
    let (mut threads, mut size, mut secs, mut mode) = (32usize, 4096usize, 5u64, DataSync::PerFile);
    let mut keep = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--keep" {
            keep = true;
            continue;
        }
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--dir" => dir = v.into(),
            "--threads" => threads = v.parse().unwrap_or(threads),
            "--size" => size = v.parse().unwrap_or(size),
            "--secs" => secs = v.parse().unwrap_or(secs),
            "--mode" => {
                mode = match v.as_str() {
                    "batch" => DataSync::Batch,
                    _ => DataSync::PerFile,
                }
            }
            _ => {
                eprintln!(
                    "usage: spoolbench --dir D --threads N --size B --secs S --mode file|batch [--keep]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let opts = SpoolOptions {
        data_sync: mode,
        ..SpoolOptions::default()
    };
    let (md, writer) = match Maildir::open_with(&dir, "spoolbench", opts, Arc::default()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("spoolbench: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let md = Arc::new(md);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let body = vec![b'x'; size];
    let cpu_before = machine_busy();
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (md, stop, done, body) = (md.clone(), stop.clone(), done.clone(), body.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = md.begin().map_err(|e| e.to_string()).and_then(|mut m| {
                        m.write_all(&body).map_err(|e| e.to_string())?;
                        m.commit().map_err(|e| e.to_string())
                    });
                    if let Err(e) = ok {
                        eprintln!("spoolbench: {e}");
                        break;
                    }
                    lat.push(t.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap_or_default())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = machine_busy()
        .zip(cpu_before)
        .map(|((b1, t1), (b0, t0))| (b1 - b0, t1 - t0));
    drop(md);
    let _ = writer.join();
    lat.sort_unstable();
    let p99 = lat
        .get(lat.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default();
    let n = done.load(Ordering::Relaxed);
    // Jiffies are 1/100 s on Linux (USER_HZ); busy over total is the share of all cores.
    let (busy_pct, cpu_us) = match cpu {
        Some((busy, total)) if total > 0 && n > 0 => (
            100.0 * busy as f64 / total as f64,
            busy as f64 * 10_000.0 / n as f64,
        ),
        _ => (0.0, 0.0),
    };
    println!(
        "{{\"mode\":\"{}\",\"threads\":{threads},\"size\":{size},\"messages\":{n},\"msgs_per_sec\":{:.0},\"p99_ms\":{:.2},\"machine_busy_pct\":{busy_pct:.0},\"cpu_us_per_msg\":{cpu_us:.0}}}",
        match mode {
            DataSync::Batch => "batch",
            DataSync::PerFile => "file",
        },
        n as f64 / elapsed,
        p99.as_secs_f64() * 1000.0
    );
    if !keep {
        let _ = std::fs::remove_dir_all(dir.join("new"));
    }
    ExitCode::SUCCESS
}

/// (busy, total) jiffies of all CPUs from /proc/stat; iowait counts as idle.
fn machine_busy() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some((busy, busy + v.get(3)? + v.get(4)?))
}
