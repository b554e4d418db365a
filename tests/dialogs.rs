//! Plays every `tests/dialogs/*.smtp` script against a real server over loopback TCP.
//!
//! A script is an SMTP conversation written as it happens, one line per step, so the
//! reply contract (`docs/smtp.md`) can be reviewed without reading Rust:
//!
//! | line | meaning |
//! |---|---|
//! | `# …` or blank | comment |
//! | `@tls` | give the server a `[tls]` table with a fresh certificate |
//! | `@server key = value` | a line for the `[server]` table |
//! | `@tls-extra key = value` | a line for the `[tls]` table |
//! | `@config` … `@end` | TOML appended to the server's configuration |
//! | `C: text` | the client sends `text` and CRLF |
//! | `C> bytes` | the client sends the bytes as they are (`\r`, `\n`, `\t`, `\\`, `\xNN`) |
//! | `S: text` | the server's next line is exactly `text` (CRLF stripped); a final `*` matches any rest |
//! | `S~ 250` | the server's next whole reply (all its lines) has this code |
//! | `@starttls` | run the TLS handshake now (after `220` to `STARTTLS`) |
//! | `@closed` | the server closes the connection now |
//! | `@stored N` | `new/` holds exactly N messages |
//! | `@content bytes` | the newest stored message, after the trace headers, is exactly these bytes |
//!
//! Each script runs against its own server.

mod common;

use common::{split_stored, wait_until, Client, Opts, TestServer};
use std::path::Path;

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

fn play(path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let text = std::fs::read_to_string(path).unwrap();
    let mut opts = Opts::default();
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
        } else if let Some(v) = l.strip_prefix("@server ") {
            opts.server_extra.push_str(v);
            opts.server_extra.push('\n');
        } else if let Some(v) = l.strip_prefix("@tls-extra ") {
            opts.tls_extra.push_str(v);
            opts.tls_extra.push('\n');
        } else if !(l.trim().is_empty() || l.starts_with('#')) {
            steps.push((at, l.to_string()));
        }
    }
    assert!(!in_config, "{name}: @config without @end");
    let server = TestServer::start(opts);
    let mut c = Client::connect(server.addr);
    for (at, step) in steps {
        if let Some(t) = step.strip_prefix("C: ") {
            c.send(t);
        } else if let Some(t) = step.strip_prefix("C> ") {
            c.send_raw(&unescape(t, &at));
        } else if let Some(want) = step.strip_prefix("S: ") {
            let got = line(&mut c, &at);
            match want.strip_suffix('*') {
                Some(prefix) => {
                    assert!(got.starts_with(prefix), "{at}: want {want:?}, got {got:?}")
                }
                None => assert_eq!(got, want, "{at}"),
            }
        } else if let Some(code) = step.strip_prefix("S~ ") {
            let (got, all) = c.reply();
            assert_eq!(got.to_string(), code.trim(), "{at}: reply {all:?}");
        } else if step == "@starttls" {
            c.upgrade(server.tls_client_config());
        } else if step == "@closed" {
            assert!(c.is_closed(), "{at}: the connection is still open");
        } else if let Some(n) = step.strip_prefix("@stored ") {
            let n: usize = n
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{at}: @stored N"));
            wait_until(&format!("{at}: {n} stored"), || server.stored().len() >= n);
            assert_eq!(server.stored().len(), n, "{at}: stored messages");
        } else if let Some(bytes) = step.strip_prefix("@content ") {
            let stored = server.stored();
            let (_, content) = split_stored(&stored.last().expect("a stored message").1);
            assert_eq!(
                String::from_utf8_lossy(&content),
                String::from_utf8_lossy(&unescape(bytes, &at)),
                "{at}"
            );
        } else {
            panic!("{at}: unknown step {step:?}");
        }
    }
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
    // One thread per script: each has its own server, and a failure names its script.
    let failed: Vec<String> = scripts
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::thread::spawn(move || play(&p)))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|(name, t)| t.join().is_err().then_some(name))
        .collect();
    assert!(failed.is_empty(), "dialog scripts failed: {failed:?}");
}
