//! SPEC invariant 1 under crashes: the real binary (fsync on) is SIGKILLed at varying
//! moments while several clients stream messages into it. After every kill, and again
//! after a restart on the same spool: every message that got 250 is in `new/` whole,
//! nothing partial is in `new/`, and `tmp/` is empty once the server is back.
//!
//! Rounds alternate the two `[spool] data_sync` modes on the same spool: `"file"`
//! (each session fdatasyncs its file) and `"batch"` (the spool writer syncfs's a whole
//! batch before renaming it); each mode is killed in the same number of rounds, and a
//! restart in one mode must find every message acknowledged in the other.
mod common;
use common::process::{free_port, write_config, ChildServer};
use common::split_stored;
use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Rounds that end in a SIGKILL; even, so each mode gets as many.
const ROUNDS: u64 = 6;
/// `[spool] data_sync` of round `r` is `MODES[r % 2]`.
const MODES: [&str; 2] = ["file", "batch"];
const CLIENTS: usize = 3;

/// The exact content of message `idx`: its index in the Subject, then 1–25 KB of lines
/// derived from the index, so any truncation or mix-up is detectable.
fn content(idx: u64) -> Vec<u8> {
    let mut v =
        format!("Subject: crash {idx}\r\nMessage-Id: <{idx}@crash.test>\r\n\r\n").into_bytes();
    let lines = 10 + (idx.wrapping_mul(7919) % 500);
    for j in 0..lines {
        v.extend_from_slice(
            format!(
                "message {idx} line {j} {}\r\n",
                "x".repeat((j % 23) as usize)
            )
            .as_bytes(),
        );
    }
    v
}

/// The index in `Subject: crash N`.
fn index_of(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.strip_prefix("Subject: crash ")?;
    line[..line.find("\r\n")?].parse().ok()
}

/// One SMTP reply's code and last line; an I/O error once the server is gone.
fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let reply = mailer::client::read_reply(r)?;
    let last = reply.lines.last().map_or("", |l| l.trim_end());
    Ok((reply.code, last.to_string()))
}

/// One acknowledged message: its index, its queue id, and the mode of the server that
/// said 250.
type Acked = (u64, String, &'static str);

/// Sends messages until the connection breaks; records each 250.
fn stream_messages(
    addr: SocketAddr,
    mode: &'static str,
    next: &AtomicU64,
    acked: &Mutex<Vec<Acked>>,
) -> std::io::Result<()> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut w = tcp.try_clone()?;
    let mut r = BufReader::new(tcp);
    if reply(&mut r)?.0 != 220 {
        return Ok(());
    }
    w.write_all(b"EHLO crash.test\r\n")?;
    reply(&mut r)?;
    loop {
        let idx = next.fetch_add(1, Ordering::SeqCst);
        // Pipelined envelope (RFC 2920).
        w.write_all(b"MAIL FROM:<c@x.test>\r\nRCPT TO:<r@y.test>\r\nDATA\r\n")?;
        for want in [250, 250, 354] {
            let (code, text) = reply(&mut r)?;
            if code != want {
                return Err(std::io::Error::other(text));
            }
        }
        let mut wire = content(idx); // no line starts with '.', so no stuffing needed
        wire.extend_from_slice(b".\r\n");
        w.write_all(&wire)?;
        let (code, text) = reply(&mut r)?;
        if code != 250 {
            return Err(std::io::Error::other(text));
        }
        let id = text.rsplit(' ').next().unwrap_or("").to_string();
        acked.lock().unwrap().push((idx, id, mode));
    }
}

fn names(dir: &Path) -> Vec<String> {
    // Before the first start the spool does not exist yet: no names.
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every file in new/ is a whole message: trace headers naming its queue id, and
/// exactly the content of the index in its Subject. Returns index -> file name.
/// `known` caches files already verified (a file in new/ is never rewritten), so each
/// file's bytes are compared once; the final pass passes an empty cache.
fn check_new(spool: &Path, when: &str, known: &mut BTreeMap<String, u64>) -> BTreeMap<u64, String> {
    let mut seen = BTreeMap::new();
    for name in names(&spool.join("new")) {
        if let Some(&idx) = known.get(&name) {
            assert!(
                seen.insert(idx, name.clone()).is_none(),
                "{when}: message {idx} stored twice"
            );
            continue;
        }
        let bytes = std::fs::read(spool.join("new").join(&name)).unwrap();
        let (trace, body) = split_stored(&bytes);
        let idx = index_of(&body).unwrap_or_else(|| {
            panic!(
                "{when}: {name} is not a whole message: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            )
        });
        assert!(
            body == content(idx),
            "{when}: {name} holds a partial or corrupt message {idx} ({} of {} bytes)",
            body.len(),
            content(idx).len()
        );
        assert!(
            trace.starts_with("Return-Path: <c@x.test>\r\nX-Original-To: r@y.test\r\nReceived: from crash.test ([127.0.0.1]) by mx.test with ESMTP\r\n"),
            "{when}: {name}: {trace}"
        );
        let id = name.split('.').nth(1).unwrap();
        assert!(
            trace.contains(&format!(" id {id} ; ")),
            "{when}: {name}: {trace}"
        );
        assert!(
            seen.insert(idx, name.clone()).is_none(),
            "{when}: message {idx} stored twice"
        );
        known.insert(name, idx);
    }
    seen
}

#[test]
fn sigkill_at_any_moment_loses_no_acknowledged_message_and_leaves_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let mut rng = 0x5EED_u64;
    let mut debris_rounds = 0;
    let mut known = BTreeMap::new();
    for round in 0..=ROUNDS {
        let mode = MODES[round as usize % MODES.len()];
        let cfg = write_config(
            dir.path(),
            free_port(),
            &spool,
            "",
            &format!("data_sync = {mode:?}"),
        );
        let before_restart = names(&spool.join("new"));
        let mut p = ChildServer::start(&cfg, &[]);
        // Waits for a greeting: the spool is open and tmp/ has been cleared.
        let addr = p.ready(1)[0];
        assert_eq!(
            names(&spool.join("tmp")),
            Vec::<String>::new(),
            "round {round} ({mode}): tmp/ not cleared at start"
        );
        assert_eq!(
            names(&spool.join("new")),
            before_restart,
            "round {round} ({mode}): restart changed new/"
        );
        let stored = check_new(
            &spool,
            &format!("after restart {round} ({mode})"),
            &mut known,
        );
        for (idx, id, acked_in) in acked.lock().unwrap().iter() {
            let name = stored.get(idx).unwrap_or_else(|| {
                panic!("round {round} ({mode}): message {idx} got 250 ({id}) with data_sync = {acked_in:?} but is not in new/")
            });
            assert!(
                name.contains(&format!(".{id}.")),
                "{acked_in}: {name} vs {id}"
            );
        }
        if round == ROUNDS {
            p.signal("TERM");
            let st = p.wait_exit(Duration::from_secs(10)).expect("final stop");
            assert!(st.success());
            break;
        }
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (next, acked) = (Arc::clone(&next), Arc::clone(&acked));
                std::thread::spawn(move || {
                    let _ = stream_messages(addr, mode, &next, &acked);
                })
            })
            .collect();
        // xorshift: a different, reproducible moment each round (100–900 ms in).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = 100 + rng % 800;
        let acked_before = acked.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(delay));
        p.signal("KILL");
        let st = p.wait_exit(Duration::from_secs(10)).expect("killed");
        assert!(!st.success());
        for c in clients {
            c.join().unwrap();
        }
        let tmp = names(&spool.join("tmp"));
        if !tmp.is_empty() {
            debris_rounds += 1;
        }
        // Right after the crash, before any cleanup: new/ holds only whole messages.
        check_new(&spool, &format!("after kill {round} ({mode})"), &mut known);
        eprintln!(
            "round {round} ({mode}): killed after {delay} ms; {} acked this round, {} in new/, {} debris file(s) in tmp/",
            acked.lock().unwrap().len() - acked_before,
            names(&spool.join("new")).len(),
            tmp.len()
        );
    }
    // Once more from scratch: every file's bytes, every acknowledged id.
    let stored = check_new(&spool, "at the end", &mut BTreeMap::new());
    let acked = acked.lock().unwrap();
    for (idx, id, acked_in) in acked.iter() {
        assert!(
            stored
                .get(idx)
                .is_some_and(|n| n.contains(&format!(".{id}."))),
            "{acked_in}: {idx} {id}"
        );
    }
    eprintln!(
        "{} messages acknowledged over {ROUNDS} crashes; debris in tmp/ after {debris_rounds} of them",
        acked.len()
    );
    for mode in MODES {
        let n = acked.iter().filter(|a| a.2 == mode).count();
        eprintln!("  data_sync = {mode:?}: {n} acknowledged");
        assert!(
            n >= ROUNDS as usize / MODES.len(),
            "data_sync = {mode:?}: too few messages got through ({n}) to make the test meaningful"
        );
    }
}
