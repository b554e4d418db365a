//! SPEC 2: the command line, its output and its exit codes (0 ok, 2 usage or config
//! error naming file, key and line, 1 runtime failure such as a port in use).
mod common;
use common::process::{run, run_refused_config, write_config};
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn help_prints_usage_and_exits_0() {
    let out = run(&["--help"], b"");
    assert_eq!(out.status.code(), Some(0));
    for cmd in [
        "--config PATH",
        "check-config",
        "send",
        "hash-password",
        "--version",
    ] {
        assert!(
            out.stdout.contains(cmd),
            "usage lacks {cmd}: {}",
            out.stdout
        );
    }
}

#[test]
fn version_exits_0() {
    let out = run(&["--version"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout,
        format!("mailer {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_on_a_good_file_exits_0_and_prints_the_effective_settings() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write(
        d.path(),
        "good.toml",
        "hostname = \"mx.example\"\n[limits]\nmax_recipients = 7\n",
    );
    let res = run(&["check-config", "--config", &cfg], b"");
    assert_eq!(res.status.code(), Some(0), "{}", res.stderr);
    let out = res.stdout;
    assert!(out.contains(&cfg) && out.contains("OK"), "{out}");
    // What was set, and the defaults for what was not.
    for line in [
        "hostname = \"mx.example\"",
        "max_recipients = 7",
        "max_message_size = 26214400",
        "max_line_length = 1000",
        "workers = 64",
        "bare_lf = \"normalize\"",
        "fsync = true",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // The printed settings are themselves a valid config file.
    let printed = write(
        d.path(),
        "printed.toml",
        &out.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let res = run(&["check-config", "--config", &printed], b"");
    assert_eq!(res.status.code(), Some(0), "{}", res.stderr);
}

#[test]
fn unknown_key_exits_2_naming_file_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write(
        d.path(),
        "typo.toml",
        "hostname = \"mx.test\"\n[limits]\nmax_recipents = 3\n",
    );
    for (args, out) in run_refused_config(&cfg) {
        let err = &out.stderr;
        assert_eq!(out.status.code(), Some(2), "{args}: {}{err}", out.stdout);
        assert!(err.contains(&cfg), "file not named: {err}");
        assert!(err.contains("max_recipents"), "key not named: {err}");
        assert!(err.contains("line 3"), "line not named: {err}");
    }
}

#[test]
fn wrong_type_exits_2_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write(d.path(), "type.toml", "[server]\nworkers = \"many\"\n");
    let out = run(&["check-config", "--config", &cfg], b"");
    let err = &out.stderr;
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&cfg) && err.contains("workers") && err.contains("line 2"),
        "{err}"
    );
    // A value of the right type but out of range is a config error too.
    let cfg = write(d.path(), "zero.toml", "[limits]\nmax_errors = 0\n");
    let out = run(&["check-config", "--config", &cfg], b"");
    let err = &out.stderr;
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("max_errors"), "{err}");
}

#[test]
fn missing_config_file_exits_2() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.toml").display().to_string();
    for (args, out) in run_refused_config(&missing) {
        let err = &out.stderr;
        assert_eq!(out.status.code(), Some(2), "{args}: {err}");
        assert!(err.contains(&missing), "{err}");
    }
}

#[test]
fn bad_usage_exits_2_with_the_usage() {
    for args in [
        vec!["--config", "x.toml", "--bogus"],
        vec!["--bogus"],
        vec!["--config"],
        vec!["check-config", "--frob"],
    ] {
        let out = run(&args, b"");
        let err = &out.stderr;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("usage:"), "{args:?}: {err}");
    }
}

#[test]
fn a_port_already_in_use_exits_1() {
    let d = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = write_config(d.path(), port, &d.path().join("spool"), "", "");
    let out = run(&["--config", cfg.to_str().unwrap()], b"");
    let err = &out.stderr;
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    drop(taken);
}
