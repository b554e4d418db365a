//! Plays every `tests/dialogs/*.smtp` script against a real server over loopback TCP,
//! and, unless the script needs a real socket, once more in memory (`mailer::testing`:
//! the same session and connection driver over a scripted stream and a memory store),
//! so the reply contract holds both ways.
//!
//! A script is an SMTP conversation written as it happens, one line per step, so the
//! reply contract (`docs/smtp.md`) can be reviewed without reading Rust:
//!
//! | line | meaning |
//! |---|---|
//! | `# …` or blank | comment |
//! | `@tls` | give the server a `[tls]` table with a fresh certificate (TCP only) |
//! | `@server key = value` | a line for the `[server]` table (TCP only) |
//! | `@tls-extra key = value` | a line for the `[tls]` table (TCP only) |
//! | `@config` … `@end` | TOML appended to the server's configuration |
//! | `C: text` | the client sends `text` and CRLF |
//! | `C> bytes` | the client sends the bytes as they are (`\r`, `\n`, `\t`, `\\`, `\xNN`) |
//! | `S: text` | the server's next line is exactly `text` (CRLF stripped); a final `*` matches any rest |
//! | `S~ 250` | the server's next whole reply (all its lines) has this code |
//! | `@starttls` | run the TLS handshake now (after `220` to `STARTTLS`; TCP only) |
//! | `@closed` | the server closes the connection now |
//! | `@stored N` | `new/` holds exactly N messages |
//! | `@content bytes` | the newest stored message, after the trace headers, is exactly these bytes |
//! | `@store-fails full` | storing fails as on a full disk (ENOSPC when the file is created) |
//! | `@store-fails io` | storing fails with an I/O error (EIO when the message file is synced) |
//! | `@shutdown` | the server is asked to stop now (TCP only) |
//! | `@sleep MS` | the client waits this many milliseconds (TCP only) |
//! | `@connect` | a second connection from the same address; the steps after it are its own, the first stays open (TCP only) |
//!
//! In memory the client's bytes all arrive at once, as if pipelined, and the replies
//! are matched afterwards. A script runs there too when its `@config` sets only keys
//! the in-memory runner models (`hostname`, `[limits]` sizes, counts and `bare_lf`,
//! `[policy] accept_domains`); anything else (`[auth]`, other limits) keeps it on TCP.

mod common;

use common::{split_stored, wait_until, Client, Opts, TestServer};
use mailer::config::BareLfPolicy;
use mailer::hooks::Policy;
use mailer::testing::{read_wire_reply, Fail, Faults, Mem, MemRun, Op};
use mailer::Config;
use rustix::io::Errno;
use std::path::Path;
use std::sync::Arc;

/// A storage failure a script asks for.
#[derive(Clone, Copy)]
enum StoreFails {
    /// Out of space when the message file is created: 452 4.3.1.
    Full,
    /// An I/O error when the message is made durable: 451 4.3.0.
    Io,
}

/// Fails one storage step with one errno (the TCP server's `@store-fails`).
struct FailAt(Op, Errno);

impl Faults for FailAt {
    fn before(&self, op: Op) -> std::io::Result<()> {
        if op == self.0 {
            return Err(std::io::Error::from_raw_os_error(self.1.raw_os_error()));
        }
        Ok(())
    }
}

/// A parsed script: the server's configuration and the steps, each with its position.
struct Script {
    name: String,
    opts: Opts,
    /// Why the script cannot run in memory, if it cannot.
    tcp_only: Option<String>,
    /// `@store-fails`: where the store fails.
    store_fails: Option<StoreFails>,
    steps: Vec<(String, String)>,
}

/// Decodes `\r`, `\n`, `\t`, `\\` and `\xNN`.
fn unescape(s: &str, at: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let next = b.get(i + 1).copied();
        match next {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = s
                    .get(i + 2..i + 4)
                    .unwrap_or_else(|| panic!("{at}: bad \\x"));
                out.push(u8::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{at}: bad \\x")));
                i += 2;
            }
            _ => panic!("{at}: unknown escape in {s:?}"),
        }
        i += 2;
    }
    out
}

fn parse(path: &Path) -> Script {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let text = std::fs::read_to_string(path).unwrap();
    let mut opts = Opts::default();
    let mut tcp_only = None;
    let mut store_fails = None;
    let mut steps = Vec::new();
    let mut in_config = false;
    for (n, l) in text.lines().enumerate() {
        let at = format!("{name}:{}", n + 1);
        if in_config {
            if l == "@end" {
                in_config = false;
            } else {
                opts.toml.push_str(l);
                opts.toml.push('\n');
            }
        } else if l == "@config" {
            in_config = true;
        } else if l == "@tls" {
            opts.tls = true;
            tcp_only = Some("@tls".to_string());
        } else if let Some(v) = l.strip_prefix("@server ") {
            opts.server_extra.push_str(v);
            opts.server_extra.push('\n');
            tcp_only = Some("@server".to_string());
        } else if let Some(v) = l.strip_prefix("@tls-extra ") {
            opts.tls_extra.push_str(v);
            opts.tls_extra.push('\n');
            tcp_only = Some("@tls-extra".to_string());
        } else if let Some(v) = l.strip_prefix("@store-fails ") {
            store_fails = Some(match v.trim() {
                "full" => StoreFails::Full,
                "io" => StoreFails::Io,
                _ => panic!("{at}: @store-fails full|io"),
            });
        } else if !(l.trim().is_empty() || l.starts_with('#')) {
            if ["@starttls", "@shutdown", "@connect"].contains(&l) || l.starts_with("@sleep ") {
                tcp_only = Some(l.to_string());
            }
            steps.push((at, l.to_string()));
        }
    }
    assert!(!in_config, "{name}: @config without @end");
    if let Some(f) = store_fails {
        let faults = Arc::new(match f {
            StoreFails::Full => FailAt(Op::Create, Errno::NOSPC),
            StoreFails::Io => FailAt(Op::SyncFile, Errno::IO),
        });
        opts.hooks = Some(Box::new(move |b| b.spool_faults(faults)));
    }
    Script {
        name,
        opts,
        tcp_only,
        store_fails,
        steps,
    }
}

/// Reads one raw reply line (CRLF stripped), failing with the script position.
fn line(c: &mut Client, at: &str) -> String {
    let mut l = String::new();
    let n = c
        .read_line(&mut l)
        .unwrap_or_else(|e| panic!("{at}: read: {e}"));
    assert!(n > 0, "{at}: the server closed the connection");
    assert!(l.ends_with("\r\n"), "{at}: reply line without CRLF: {l:?}");
    l.truncate(l.len() - 2);
    l
}

fn play_tcp(script: Script) {
    let Script { opts, steps, .. } = script;
    let server = TestServer::start(opts);
    let mut c = Client::connect(server.addr);
    // Connections a later `@connect` moved past, kept open until the script ends.
    let mut earlier = Vec::new();
    for (at, step) in steps {
        if let Some(t) = step.strip_prefix("C: ") {
            c.send(t);
        } else if let Some(t) = step.strip_prefix("C> ") {
            c.send_raw(&unescape(t, &at));
        } else if let Some(want) = step.strip_prefix("S: ") {
            expect_line(&line(&mut c, &at), want, &at);
        } else if let Some(code) = step.strip_prefix("S~ ") {
            let (got, all) = c.reply();
            assert_eq!(got.to_string(), code.trim(), "{at}: reply {all:?}");
        } else if step == "@starttls" {
            c.upgrade(server.tls_client_config());
        } else if step == "@connect" {
            earlier.push(std::mem::replace(&mut c, Client::connect(server.addr)));
        } else if step == "@shutdown" {
            server.handle.shutdown();
        } else if let Some(ms) = step.strip_prefix("@sleep ") {
            let ms = ms
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{at}: @sleep MS"));
            std::thread::sleep(std::time::Duration::from_millis(ms));
        } else if step == "@closed" {
            assert!(c.is_closed(), "{at}: the connection is still open");
        } else if let Some(n) = step.strip_prefix("@stored ") {
            let n = stored_count(n, &at);
            wait_until(&format!("{at}: {n} stored"), || server.stored().len() >= n);
            assert_eq!(server.stored().len(), n, "{at}: stored messages");
        } else if let Some(bytes) = step.strip_prefix("@content ") {
            let stored = server.stored();
            let newest = &stored.last().expect("a stored message").1;
            expect_content(newest, bytes, &at);
        } else {
            panic!("{at}: unknown step {step:?}");
        }
    }
}

/// `S: want` against one reply line; a final `*` in `want` matches any rest.
fn expect_line(got: &str, want: &str, at: &str) {
    match want.strip_suffix('*') {
        Some(prefix) => assert!(got.starts_with(prefix), "{at}: want {want:?}, got {got:?}"),
        None => assert_eq!(got, want, "{at}"),
    }
}

fn stored_count(n: &str, at: &str) -> usize {
    n.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{at}: @stored N"))
}

/// `@content bytes` against a stored file (trace headers, then the message).
fn expect_content(file: &[u8], bytes: &str, at: &str) {
    let (_, content) = split_stored(file);
    assert_eq!(
        String::from_utf8_lossy(&content),
        String::from_utf8_lossy(&unescape(bytes, at)),
        "{at}"
    );
}

/// The in-memory session for a script's configuration, or why there is none: the
/// runner models only some keys, and any other that differs from the test server's
/// configuration keeps the script on TCP.
fn memory_session(script: &Script) -> Result<Mem, String> {
    if let Some(why) = &script.tcp_only {
        return Err(why.clone());
    }
    let base = "hostname = \"mx.test\"\n";
    let parse = |toml: &str| Config::from_toml(toml, Path::new("dialog.toml"));
    let cfg = parse(&format!("{base}{}", script.opts.toml)).map_err(|e| e.to_string())?;
    let mut rest = cfg.clone();
    let plain = parse(base).expect("the base configuration");
    rest.hostname = plain.hostname.clone();
    rest.policy = plain.policy.clone();
    let l = &mut rest.limits;
    l.max_message_size = plain.limits.max_message_size;
    l.max_recipients = plain.limits.max_recipients;
    l.max_errors = plain.limits.max_errors;
    l.max_line_length = plain.limits.max_line_length;
    l.bare_lf = plain.limits.bare_lf;
    if rest.to_toml() != plain.to_toml() {
        return Err("@config keys the in-memory runner does not model".to_string());
    }
    Ok(Mem {
        hostname: cfg.hostname.clone(),
        max_message_size: cfg.limits.max_message_size,
        max_recipients: cfg.limits.max_recipients,
        max_errors: cfg.limits.max_errors,
        max_line_length: cfg.limits.max_line_length,
        bare_lf: match cfg.limits.bare_lf {
            BareLfPolicy::Normalize => mailer::protocol::data::BareLf::Normalize,
            BareLfPolicy::Reject => mailer::protocol::data::BareLf::Reject,
        },
        // The server's own `[policy]` hook, as `Server::builder` installs it.
        hooks: Arc::new(Policy::new(&cfg.policy.accept_domains)),
        fail: match script.store_fails {
            None => Fail::Never,
            Some(StoreFails::Full) => Fail::Begin,
            Some(StoreFails::Io) => Fail::Commit,
        },
        ..Mem::default()
    })
}

/// Plays a script in memory: all the client's bytes at once, then the replies in order.
fn play_memory(script: &Script, mem: &Mem) {
    let mut input = Vec::new();
    for (at, step) in &script.steps {
        if let Some(t) = step.strip_prefix("C: ") {
            input.extend_from_slice(t.as_bytes());
            input.extend_from_slice(b"\r\n");
        } else if let Some(t) = step.strip_prefix("C> ") {
            input.extend_from_slice(&unescape(t, at));
        }
    }
    let run = mem.run(&input);
    assert_eq!(run.open_writers, 0, "{}: writers left open", script.name);
    let mut out = &run.output[..];
    let mut last_stored = None;
    for (at, step) in &script.steps {
        if step.starts_with("C: ") || step.starts_with("C> ") {
            continue;
        }
        let read = run.output.len() - out.len();
        if let Some(want) = step.strip_prefix("S: ") {
            let end = out.windows(2).position(|w| w == b"\r\n");
            let end = end.unwrap_or_else(|| panic!("{at}: no more reply lines in memory"));
            expect_line(&String::from_utf8_lossy(&out[..end]), want, at);
            out = &out[end + 2..];
        } else if let Some(code) = step.strip_prefix("S~ ") {
            let (reply, wire) = read_wire_reply(&mut out).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(reply.code.to_string(), code.trim(), "{at}: reply {wire:?}");
        } else if step == "@closed" {
            assert!(
                out.is_empty(),
                "{at}: more replies: {:?}",
                String::from_utf8_lossy(out)
            );
            assert_ne!(
                run.end,
                mailer::connection::End::Eof,
                "{at}: the client ended the session"
            );
        } else if let Some(n) = step.strip_prefix("@stored ") {
            let n = stored_count(n, at);
            assert_eq!(acknowledged(&run, read).len(), n, "{at}: stored messages");
            last_stored = Some(n);
        } else if let Some(bytes) = step.strip_prefix("@content ") {
            let acked = acknowledged(&run, read);
            expect_content(&acked.last().expect("a stored message").1, bytes, at);
        } else {
            panic!("{at}: step {step:?} in memory");
        }
    }
    if let Some(n) = last_stored {
        assert_eq!(
            run.stored.len(),
            n,
            "{}: stored messages at the end",
            script.name
        );
    }
}

/// The stored messages whose `queued as` reply is among the first `read` output bytes.
fn acknowledged(run: &MemRun, read: usize) -> Vec<&(String, Vec<u8>)> {
    let seen = String::from_utf8_lossy(&run.output[..read]);
    run.stored
        .iter()
        .filter(|(id, _)| seen.contains(&format!("queued as {id}")))
        .collect()
}

#[test]
fn every_dialog_script_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogs");
    let mut scripts: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "smtp"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 20, "dialog scripts missing in {dir:?}");
    // In memory first, one script after the other (cheap); then over TCP, one thread
    // per script: each has its own server, and a failure names its script and mode.
    let mut failed = Vec::new();
    let mut in_memory = Vec::new();
    for p in &scripts {
        let script = parse(p);
        match memory_session(&script) {
            Ok(mem) => {
                let name = script.name.clone();
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    play_memory(&script, &mem)
                }))
                .is_err()
                {
                    failed.push(format!("{name} (memory)"));
                }
                in_memory.push(name);
            }
            Err(why) => eprintln!("{}: TCP only ({why})", script.name),
        }
    }
    let tcp: Vec<_> = scripts
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::thread::spawn(move || play_tcp(parse(&p))))
        })
        .collect();
    for (name, t) in tcp {
        if t.join().is_err() {
            failed.push(format!("{name} (TCP)"));
        }
    }
    assert!(failed.is_empty(), "dialog scripts failed: {failed:?}");
    assert!(
        in_memory.len() >= 20,
        "too few scripts ran in memory: {in_memory:?}"
    );
}
