//! Sanity check of the benchmark's load generator (`examples/loadgen.rs`, issue 9): it
//! delivers what it claims against a real in-process server, counts refusals as
//! failures, and prints the one JSON line that `bench/compare.sh` parses.
mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;

/// The example binary, built by `cargo test` with the other targets; built here when
/// only this test target was asked for.
fn loadgen() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/loadgen-<hash> -> target/<profile>/examples/loadgen
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(format!("loadgen{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "--example", "loadgen"])
            .status()
            .unwrap();
        assert!(st.success(), "cargo build --example loadgen");
    }
    path
}

/// Runs loadgen against `port`; returns (exit code, its JSON line parsed, and raw).
fn run(port: u16, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(loadgen())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--timeout", "30"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {stdout:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    (out.status.code().unwrap(), v, lines[0].to_string())
}

#[test]
fn delivers_every_message_and_reports_one_json_line() {
    let s = TestServer::plain();
    let (code, v, raw) = run(
        s.addr.port(),
        &[
            "--sessions",
            "3",
            "--messages",
            "25",
            "--size",
            "3000",
            "--rcpts",
            "2",
            "--per-conn",
            "4",
            "--pipelining",
        ],
    );
    assert_eq!(code, 0, "{v}");
    // Exactly these keys, in this order.
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let want = [
        "sessions",
        "messages",
        "ok",
        "failed",
        "secs",
        "msgs_per_sec",
        "mib_per_sec",
        "p50_ms",
        "p99_ms",
        "max_ms",
    ];
    assert_eq!(keys.len(), want.len(), "{raw}");
    let at: Vec<usize> = want
        .iter()
        .map(|k| raw.find(&format!("\"{k}\":")).expect(k))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "key order: {raw}");
    assert_eq!(v["sessions"], 3);
    assert_eq!(v["messages"], 25);
    assert_eq!(v["ok"], 25);
    assert_eq!(v["failed"], 0);
    assert!(v["p50_ms"].as_f64().unwrap() <= v["p99_ms"].as_f64().unwrap());
    assert!(v["p99_ms"].as_f64().unwrap() <= v["max_ms"].as_f64().unwrap());
    let stored = s.stored();
    assert_eq!(stored.len(), 25);
    // Each message: two recipients, 3000 bytes of content, as generated.
    for (_, bytes) in &stored {
        let (trace, body) = split_stored(bytes);
        assert_eq!(trace.matches("X-Original-To: ").count(), 2, "{trace}");
        assert_eq!(body.len(), 3000);
        assert!(body.ends_with(b"\r\n"));
    }
    // 25 messages at 4 per connection over 3 sessions: at least 7 connections.
    assert!(s.handle.stats().connections_total >= 7);
}

#[test]
fn refused_messages_count_as_failed() {
    let s = TestServer::with_toml("[limits]\nmax_recipients = 1\n");
    // Without pipelining the second RCPT gets 452 and the message is abandoned.
    let (code, v, _) = run(
        s.addr.port(),
        &["--sessions", "1", "--messages", "3", "--rcpts", "2"],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["ok"], 0);
    assert_eq!(v["failed"], 3);
    assert!(s.stored().is_empty());
    // With pipelining DATA still goes through with one recipient: loadgen must still
    // count it failed, since not every RCPT was accepted.
    let (code, v, _) = run(
        s.addr.port(),
        &[
            "--sessions",
            "1",
            "--messages",
            "2",
            "--rcpts",
            "2",
            "--pipelining",
        ],
    );
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["failed"], 2);
}
