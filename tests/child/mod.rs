//! The real `mailer` binary as a child process: a config file in a temp dir, a free
//! loopback port, signals sent with `kill(1)` to the child's own PID, bounded waits.
//! Used by the process-level tests (graceful stop, crash, CLI).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mailer");

/// A loopback port that was free a moment ago (bind to :0, read the port, drop).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `<dir>/config.toml` for a plain listener on `port` and the spool `spool`;
/// `server_extra` goes inside `[server]`, `extra` is appended (more sections).
pub fn write_config(
    dir: &Path,
    port: u16,
    spool: &Path,
    server_extra: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "hostname = \"mx.test\"\n\
         [server]\n\
         listen = [\"127.0.0.1:{port}\"]\n\
         workers = 8\n\
         stats_interval_secs = 0\n\
         {server_extra}\n\
         [spool]\n\
         dir = {:?}\n\
         fsync = true\n\
         {extra}\n",
        spool.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `mailer` server process. Killed (by its PID) on drop if still running.
pub struct Proc {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `mailer --config <config>` with its log (stderr) in `log`, and waits
    /// until it greets on `port`.
    pub fn start(config: &Path, port: u16, log: &Path) -> Proc {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn mailer");
        let mut p = Proc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: log.to_path_buf(),
        };
        p.wait_greeting();
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls until a connection gets `220`: the spool is open (tmp/ cleared) and the
    /// workers run. Bounded; fails with the child's log if it exits or never greets.
    pub fn wait_greeting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("mailer exited early ({st}); log:\n{}", self.log_text());
            }
            if let Ok(s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("220 ") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "mailer never greeted on {}; log:\n{}",
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`) to this child only.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kill -<sig> <pid>`.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Runs the binary with `args` to completion (bounded) and returns (status, stdout, stderr).
pub fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailer");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mailer {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}
