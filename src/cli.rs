//! The `mailer` command line: serve, check a configuration, send one message, hash a
//! password. The binary's `main` calls [`main`]; everything it needs stays inside the
//! crate.

use crate::{Config, Server};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
usage:
  mailer [--config PATH]                 run the server in the foreground (default ./config.toml)
  mailer check-config [--config PATH]    validate the config, print the effective settings
  mailer send [JOB.json | -]             client: deliver one message, print a JSON report
  mailer hash-password                   read a password on stdin, print an argon2id hash
  mailer --help | --version
";

/// Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
const RUNTIME: u8 = 1;
const USAGE_OR_CONFIG: u8 = 2;

/// Runs the command line with the process's arguments and returns its exit status:
/// 0 success, 1 runtime failure, 2 usage or configuration error.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--help") | Some("-h") | Some("help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("--version") | Some("-V") => {
            println!("mailer {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("check-config") => match config_path(&args[1..]) {
            Ok(p) => check_config(&p),
            Err(e) => usage_error(&e),
        },
        Some("send") => send(&args[1..]),
        Some("hash-password") if args.len() == 1 => hash_password(),
        Some("hash-password") => usage_error("hash-password takes no arguments"),
        _ => match config_path(&args) {
            Ok(p) => serve(&p),
            Err(e) => usage_error(&e),
        },
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("mailer: {msg}\n{USAGE}");
    ExitCode::from(USAGE_OR_CONFIG)
}

/// `[--config PATH]`, nothing else.
fn config_path(args: &[String]) -> Result<PathBuf, String> {
    match args {
        [] => Ok(PathBuf::from("config.toml")),
        [flag, path] if flag == "--config" || flag == "-c" => Ok(PathBuf::from(path)),
        [flag] if flag == "--config" || flag == "-c" => Err("--config needs a path".into()),
        [other, ..] => Err(format!("unexpected argument {other:?}")),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        let _ = writeln!(std::io::stderr(), "mailer: {e}");
        ExitCode::from(USAGE_OR_CONFIG)
    })
}

fn check_config(path: &Path) -> ExitCode {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Everything that would fail at start, all at once: TLS files, users, the spool
    // directory, the listen addresses (in use: a warning, the server may be running).
    let findings = crate::preflight::preflight(&cfg);
    for f in &findings {
        // Not eprintln!: it panics when stderr is gone; the exit code still tells.
        let _ = writeln!(std::io::stderr(), "mailer: {}: {f}", path.display());
    }
    if findings.iter().any(|f| f.fatal) {
        return ExitCode::from(USAGE_OR_CONFIG);
    }
    // Not println!, which panics on a closed pipe (`mailer check-config | head -1`:
    // Rust ignores SIGPIPE, so the write fails with EPIPE instead). A reader that
    // stopped early is not a failure of the check: the config is valid.
    let mut out = std::io::stdout().lock();
    // With [mailboxes], how many users, aliases and domains the maps hold (SPEC 8).
    let summary = crate::preflight::mailbox_summary(&cfg)
        .map(|s| format!("# {s}\n"))
        .unwrap_or_default();
    let text = format!("# {}: OK\n{summary}{}", path.display(), cfg.to_toml());
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mailer: check-config: cannot write: {e}");
            ExitCode::from(RUNTIME)
        }
    }
}

fn serve(path: &Path) -> ExitCode {
    crate::logfmt::init("info");
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Signals first: a SIGHUP that arrives while the server starts must not take
    // the default action (terminate). signal-hook rather than ctrlc: ctrlc's
    // `termination` feature sends SIGINT, SIGTERM and SIGHUP to one handler that
    // cannot tell them apart, and SIGHUP must reload, never stop (SPEC 2).
    let mut signals = match Signals::new([SIGHUP, SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailer: cannot install the signal handlers: {e}");
            return ExitCode::from(RUNTIME);
        }
    };
    let server = match Server::builder(cfg).build() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailer: {}: {e}", path.display());
            return ExitCode::from(if e.is_config() {
                USAGE_OR_CONFIG
            } else {
                RUNTIME
            });
        }
    };
    let handle = server.handle();
    let signals_handle = signals.handle();
    let config_path = path.to_path_buf();
    let waiter = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    reload(&handle, &config_path);
                } else {
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    log::info!("{name}: stopping");
                    handle.shutdown();
                }
            }
        });
    let waiter = match waiter {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mailer: cannot start the signal thread: {e}");
            return ExitCode::from(RUNTIME);
        }
    };
    let result = server.run();
    signals_handle.close();
    let _ = waiter.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailer: {e}");
            ExitCode::from(RUNTIME)
        }
    }
}

/// SIGHUP: read and validate the config file again and apply what can change live.
/// Any failure leaves the running settings as they are (logged at ERROR).
fn reload(handle: &crate::Handle, path: &Path) {
    // sd_notify(3): RELOADING=1 with the monotonic time, READY=1 when done.
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        reloading.push(now);
    }
    let _ = sd_notify::notify(&reloading);
    log::info!("reload: reading {}", path.display());
    match Config::load(path) {
        Err(e) => log::error!("reload failed, keeping the running settings: {e}"),
        Ok(new) => match handle.reload(&new) {
            Ok(restart) if restart.is_empty() => log::info!("reload: done"),
            Ok(restart) => log::info!(
                "reload: done; changed keys that take effect at the next start: {}",
                restart.join(", ")
            ),
            Err(e) => log::error!("reload failed, keeping the running settings: {e}"),
        },
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// `mailer send [JOB.json | -]` (SPEC 6): a bad job exits 2 before any connection;
/// otherwise the report is printed and the exit code is 0, whatever the outcome.
fn send(args: &[String]) -> ExitCode {
    crate::logfmt::init("warn");
    let (source, read) = match args {
        [] => ("stdin".to_string(), read_stdin()),
        [dash] if dash == "-" => ("stdin".to_string(), read_stdin()),
        [path] if !path.starts_with('-') => (path.clone(), std::fs::read(path)),
        _ => return usage_error("send takes one job file, or - (or nothing) for stdin"),
    };
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mailer: send: cannot read the job from {source}: {e}");
            return ExitCode::from(USAGE_OR_CONFIG);
        }
    };
    let job = match crate::client::Job::from_json(&bytes) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("mailer: send: {source}: {e}");
            return ExitCode::from(USAGE_OR_CONFIG);
        }
    };
    for field in crate::client::Job::unknown_fields(&bytes) {
        eprintln!("mailer: send: {source}: ignoring unknown field \"{field}\"");
    }
    let report = crate::client::send(&job);
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{}", report.to_json()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailer: send: cannot write the report: {e}");
            ExitCode::from(RUNTIME)
        }
    }
}

fn read_stdin() -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::io::stdin().lock().read_to_end(&mut v)?;
    Ok(v)
}

fn hash_password() -> ExitCode {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
        set_echo(false);
    }
    let mut input = String::new();
    let read = if tty {
        stdin.read_line(&mut input).map(|_| ())
    } else {
        stdin.lock().read_to_string(&mut input).map(|_| ())
    };
    if tty {
        set_echo(true);
        eprintln!();
    }
    if let Err(e) = read {
        eprintln!("mailer: hash-password: cannot read stdin: {e}");
        return ExitCode::from(RUNTIME);
    }
    // One trailing newline is the end of input, not part of the password.
    let password = input
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&input);
    if password.is_empty() {
        eprintln!("mailer: hash-password: empty password");
        return ExitCode::from(USAGE_OR_CONFIG);
    }
    match crate::auth::hash_password(password.as_bytes()) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailer: hash-password: {e}");
            ExitCode::from(RUNTIME)
        }
    }
}

/// Terminal echo through stty: no unsafe termios calls needed.
fn set_echo(on: bool) {
    let _ = std::process::Command::new("stty")
        .arg(if on { "echo" } else { "-echo" })
        .stdin(std::process::Stdio::inherit())
        .status();
}
