//! The real `mailer` binary as a child process, for tests that need what only the
//! binary has: its exit code, its stdout/stderr, its log, real signals.
//!
//! - [`run`]: the binary once with arguments and stdin, to completion: [`Output`].
//! - [`ChildServer`]: a server started from a config file; its stderr (the log) is
//!   collected as it arrives. Wait for a log line ([`ChildServer::wait_log`]), for the
//!   logged listen addresses ([`ChildServer::listen_addrs`]) or for a real `220`
//!   greeting ([`ChildServer::ready`]); signal it by PID; wait for its exit, bounded.
//! - [`free_port`], [`write_config`]: a config for a plain listener on a known port.
//!
//! Every wait is bounded (fails the test after [`CHILD_WAIT`]); only a child this module
//! started is signalled, by its own PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mailer");

/// How long a child may take to say something, to greet or to exit.
pub const CHILD_WAIT: Duration = Duration::from_secs(20);

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

/// `kill -<sig> <pid>` (`TERM`, `INT`, `KILL`); fails the test if `kill` does.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// What a finished run of the binary printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `mailer args` with `stdin` as its input, to completion; fails the test if it
/// does not exit within [`CHILD_WAIT`]. stdout and stderr are read as they come, so a
/// chatty child never blocks on a full pipe.
pub fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mailer");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    // Dropping `input` at the end of the thread closes the child's stdin (EOF).
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let status = wait_or_kill(&mut child, CHILD_WAIT)
        .unwrap_or_else(|| panic!("mailer {args:?} did not exit within {CHILD_WAIT:?}"));
    writer.join().unwrap();
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs a config that must be refused at startup twice: `check-config --config PATH`
/// and the server itself, `--config PATH`. Returns each run with its command line (for
/// failure messages). A config that is not refused makes the server run: the run then
/// fails after [`CHILD_WAIT`].
pub fn run_refused_config(config: &str) -> Vec<(String, Output)> {
    [
        &["check-config", "--config", config][..],
        &["--config", config][..],
    ]
    .into_iter()
    .map(|args| (args.join(" "), run(args, b"")))
    .collect()
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Polls for the child's exit for up to `limit`: `None` if it is still running.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Like [`wait_bounded`], but a child still running after `limit` is killed (through
/// its own handle) and reaped before `None` is returned.
fn wait_or_kill(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let st = wait_bounded(child, limit);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    st
}

/// A running `mailer --config PATH` server. Its stderr (the log) is collected as it
/// arrives. Killed (by its own handle) on drop if still running.
pub struct ChildServer {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl ChildServer {
    /// Starts `mailer --config <config>` with `RUST_LOG=info` (needed for the
    /// `listening on` lines) and then the environment `env` (which may override it).
    /// Returns at once: wait with [`ready`](Self::ready), [`wait_log`](Self::wait_log) or
    /// [`wait_greeting`](Self::wait_greeting).
    pub fn start(config: &Path, env: &[(&str, &str)]) -> ChildServer {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mailer");
        let mut err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        ChildServer {
            child,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far (all of it once the child has exited and was waited for).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Fails the test with the log if the child has exited.
    fn assert_running(&mut self, waiting_for: &str) {
        if let Some(st) = self.child.try_wait().unwrap() {
            self.join_reader();
            panic!(
                "mailer exited ({st}) while waiting for {waiting_for}; log:\n{}",
                self.log()
            );
        }
    }

    /// Waits until the log contains `needle` `times` times; fails after [`CHILD_WAIT`]
    /// or if the child exits first.
    pub fn wait_log(&mut self, needle: &str, times: usize) {
        let deadline = Instant::now() + CHILD_WAIT;
        while self.log().matches(needle).count() < times {
            self.assert_running(&format!("{needle:?} in the log"));
            assert!(
                Instant::now() < deadline,
                "no {needle:?} ({times}x) in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The addresses from the `listening on ADDR` lines, once `n` of them were logged:
    /// plain listeners first, then implicit TLS, as configured.
    pub fn listen_addrs(&mut self, n: usize) -> Vec<SocketAddr> {
        self.wait_log("listening on ", n);
        self.log()
            .lines()
            .filter_map(|l| l.split("listening on ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    }

    /// Polls until a connection to `addr` (a plain listener) gets a `220 ` line: the
    /// spool is open (tmp/ cleared) and the workers run. Bounded; fails with the log if
    /// the child exits or never greets.
    pub fn wait_greeting(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + CHILD_WAIT;
        loop {
            self.assert_running(&format!("a greeting on {addr}"));
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("220 ") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "mailer never greeted on {addr}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `n` listen addresses in the log, then for a real greeting on the first
    /// (a plain listener); returns the addresses.
    pub fn ready(&mut self, n: usize) -> Vec<SocketAddr> {
        let addrs = self.listen_addrs(n);
        self.wait_greeting(addrs[0]);
        addrs
    }

    /// Sends `sig` (`TERM`, `INT`, `KILL`) to this child only, by its PID.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    /// Once it has exited, [`log`](Self::log) holds all it wrote.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let st = wait_bounded(&mut self.child, limit);
        if st.is_some() {
            self.join_reader();
        }
        st
    }

    /// SIGTERM, then waits (bounded by [`CHILD_WAIT`]) for the exit; returns the exit
    /// status and the whole log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let status = self
            .wait_exit(CHILD_WAIT)
            .unwrap_or_else(|| panic!("mailer did not stop within {CHILD_WAIT:?} of SIGTERM"));
        (status, self.log())
    }

    /// The stderr reader ends at EOF, which comes when the child has exited.
    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
