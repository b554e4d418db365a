//! Operations (issue 8): the counters of the stats line and `Handle::stats()`, the
//! periodic `stats:` log line of the binary, and `check-config`'s preflight checks.
mod common;
use common::*;

use std::net::TcpListener;
use std::path::Path;

#[test]
fn stats_count_messages_bytes_and_refusals_by_code() {
    let s = TestServer::start(Opts {
        toml: "[policy]\naccept_domains = [\"y.test\"]\n".into(),
        server_extra: "max_connections_per_ip = 1".into(),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    assert_eq!(s.handle.stats().connections_active, 1);
    // 421 4.7.0 at accept time: counted by code like any other refusal.
    let mut second = Client::connect(s.addr);
    assert_eq!(second.reply().0, 421);
    c.ok("FOO", 500);
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<c@z.test>", 550);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: t\r\n\r\nhello\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    c.ok("QUIT", 221);
    wait_until("session ended", || s.handle.stats().connections_active == 0);
    let st = s.handle.stats();
    let stored = s.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(st.messages_accepted, 1);
    assert_eq!(st.messages_stored, 1);
    assert_eq!(st.bytes_accepted, stored[0].1.len() as u64);
    assert_eq!(
        st.connections_total, 1,
        "the refused one never reached a worker"
    );
    assert_eq!(st.connections_refused, 1);
    // Multi-line 250 replies (EHLO) and 2xx/3xx are not refusals.
    let by_code: Vec<(u16, u64)> = st.refused.iter().map(|(c, n)| (*c, *n)).collect();
    assert_eq!(by_code, vec![(421, 1), (500, 1), (550, 1)]);
    assert_eq!(st.queue_depth, 0);
    assert_eq!(st.spool_batches, 1);
    assert!(st.commit_micros_avg > 0, "{st:?}");
    let line = st.to_string();
    assert!(!line.contains('\n'), "{line}");
    for kv in [
        "connections_active=0",
        "connections_total=1",
        "connections_refused=1",
        "messages_accepted=1",
        &format!("bytes_accepted={}", stored[0].1.len()),
        "refused_total=3",
        "refused=421:1,500:1,550:1",
        "queue_depth=0",
        "spool_batches=1",
        "fsync_us_avg=",
        "commit_us_avg=",
    ] {
        assert!(line.contains(kv), "{kv} missing from {line}");
    }
}

#[test]
fn refusals_inside_tls_sessions_are_counted() {
    let s = TestServer::start(Opts {
        tls: true,
        ..Opts::default()
    });
    let mut c = s.ehlo();
    c.ok("STARTTLS", 220);
    c.upgrade(s.tls_client_config());
    c.ok("EHLO client.test", 250);
    c.ok("RCPT TO:<b@y.test>", 503);
    c.ok("QUIT", 221);
    let st = s.handle.stats();
    assert_eq!(st.refused.get(&503), Some(&1), "{st:?}");
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn check_config(config: &Path) -> (i32, String, String) {
    let out = process::run(&["check-config", "--config", config.to_str().unwrap()], b"");
    (
        out.status.code().expect("exit code"),
        out.stdout,
        out.stderr,
    )
}

#[test]
fn check_config_reports_every_startup_failure_at_once() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let cfg = write_config(
        d.path(),
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\", \"192.0.2.1:2525\"]\n\
             [tls]\ncert = {:?}\nkey = {:?}\n[spool]\ndir = {:?}\n",
            d.path().join("missing-cert.pem").display().to_string(),
            d.path().join("missing-key.pem").display().to_string(),
            file.join("spool").display().to_string(),
        ),
    );
    let (code, stdout, stderr) = check_config(&cfg);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].contains("error: ") && lines[0].contains("missing-cert.pem"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("error: spool.dir: ") && lines[1].contains("plain-file"),
        "{stderr}"
    );
    assert!(
        lines[2].contains("error: server.listen 192.0.2.1:2525: cannot listen"),
        "{stderr}"
    );
    for l in lines {
        assert!(
            l.starts_with(&format!("mailer: {}: ", cfg.display())),
            "{l}"
        );
    }
}

#[test]
fn check_config_spool_check_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    // Missing, but its parent is writable: fine, and not created by the check.
    let missing = d.path().join("a").join("spool");
    let cfg = write_config(
        d.path(),
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[spool]\ndir = {:?}\n",
            missing.display().to_string()
        ),
    );
    let (code, stdout, stderr) = check_config(&cfg);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("# {}: OK\n", cfg.display())));
    assert!(stderr.is_empty(), "{stderr}");
    assert!(
        !d.path().join("a").exists(),
        "check-config created the spool"
    );
    // An existing Maildir: the probe files are gone afterwards.
    let spool = d.path().join("spool");
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(spool.join(sub)).unwrap();
    }
    std::fs::write(spool.join("new").join("1.M1.mx"), "kept").unwrap();
    let cfg = write_config(
        d.path(),
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[spool]\ndir = {:?}\n",
            spool.display().to_string()
        ),
    );
    let (code, _, stderr) = check_config(&cfg);
    assert_eq!(code, 0, "{stderr}");
    let names = |sub: &str| -> Vec<String> {
        std::fs::read_dir(spool.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert!(names("tmp").is_empty() && names("cur").is_empty());
    assert_eq!(names("new"), vec!["1.M1.mx".to_string()]);
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        3,
        "only tmp new cur"
    );
}

#[test]
fn check_config_warns_about_an_address_in_use() {
    let d = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let cfg = write_config(
        d.path(),
        &format!(
            "[server]\nlisten = [\"{addr}\"]\n[spool]\ndir = {:?}\n",
            d.path().join("spool").display().to_string()
        ),
    );
    let (code, stdout, stderr) = check_config(&cfg);
    assert_eq!(code, 0, "in use is a warning: {stderr}");
    assert!(stdout.contains("OK"));
    assert_eq!(
        stderr.trim_end(),
        format!(
            "mailer: {}: warning: server.listen {addr}: address in use (is the server already running?)",
            cfg.display()
        )
    );
}

#[test]
fn binary_logs_one_stats_line_per_interval() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        &format!(
            "hostname = \"mx.test\"\n[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\
             stats_interval_secs = 1\nshutdown_grace_secs = 5\n[spool]\ndir = {:?}\n",
            d.path().join("spool").display().to_string()
        ),
    );
    let mut server = process::ChildServer::start(&cfg, &[("RUST_LOG", "info")]);
    // Two ticks of 1 s, then SIGTERM to the child we started, by its PID: a graceful
    // stop logs final stats.
    server.wait_log(" stats: ", 2);
    let (status, log) = server.stop();
    let stats_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" stats: "))
        .take(2)
        .collect();
    let stopped = log.lines().find(|l| l.contains("stopped; stats: "));
    assert!(status.success(), "{status:?}");
    assert_eq!(stats_lines.len(), 2, "two ticks of 1 s");
    for l in &stats_lines {
        let kv = l.split(" stats: ").nth(1).unwrap();
        let keys: Vec<&str> = kv
            .split(' ')
            .map(|p| p.split('=').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "connections_active",
                "connections_total",
                "connections_refused",
                "messages_accepted",
                "bytes_accepted",
                "refused_total",
                "refused",
                "queue_depth",
                "spool_batches",
                "fsync_us_avg",
                "commit_us_avg"
            ],
            "{l}"
        );
        assert!(l.contains("INFO"), "{l}");
    }
    assert!(stopped.is_some(), "no final stats line");
}

#[test]
fn contrib_unit_and_config_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let text = std::fs::read_to_string(root.join("config.service.toml")).unwrap();
    // The spool is readable by the service's group (Dovecot, an application).
    assert!(text.contains("\nfile_mode = \"0640\""), "{text}");
    let cfg = mailer::Config::from_toml(&text, Path::new("config.service.toml"))
        .or_else(|e| {
            // A build without spool.file_mode (before that key was merged).
            if e.to_string().contains("file_mode") {
                let without: String = text
                    .lines()
                    .filter(|l| !l.starts_with("file_mode"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                mailer::Config::from_toml(&without, Path::new("config.service.toml"))
            } else {
                Err(e)
            }
        })
        .expect("valid config");
    let unit = std::fs::read_to_string(root.join("mailer.service")).unwrap();
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        values("ExecStart"),
        ["/usr/local/bin/mailer --config /etc/mailer/config.toml"]
    );
    // The spool is inside the only writable place under ProtectSystem=strict.
    assert_eq!(values("StateDirectory"), ["mailer"]);
    assert_eq!(values("WorkingDirectory"), ["/var/lib/mailer"]);
    assert!(cfg.spool.dir.starts_with("/var/lib/mailer/"));
    assert_eq!(values("ProtectSystem"), ["strict"]);
    assert_eq!(values("CapabilityBoundingSet"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(values("AmbientCapabilities"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(values("NoNewPrivileges"), ["yes"]);
    assert_eq!(values("Restart"), ["on-failure"]);
    assert_eq!(values("KillSignal"), ["SIGTERM"]);
    // systemd must not SIGKILL a graceful stop that is still within its grace period.
    let stop = values("TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse::<u64>()
        .unwrap();
    assert!(stop > cfg.server.shutdown_grace_secs + 5, "{stop}");
    // Readiness, reload and a fixed service user whose group may read the spool.
    assert_eq!(values("Type"), ["notify"]);
    assert_eq!(values("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(values("User"), ["mailer"]);
    assert_eq!(values("Group"), ["mailer"]);
    assert!(values("DynamicUser").is_empty());
    assert_eq!(values("UMask"), ["0027"]);
    assert_eq!(values("StateDirectoryMode"), ["0750"]);
    // The TLS files are read where SIGHUP can read them again (not a start-time copy).
    let tls = cfg.tls.expect("[tls]");
    assert_eq!(tls.cert, Path::new("/etc/mailer/cert.pem"));
    assert_eq!(tls.key, Path::new("/etc/mailer/key.pem"));
    assert!(values("LoadCredential").is_empty());
    // sd_notify needs a Unix socket.
    assert!(values("RestrictAddressFamilies")[0].contains("AF_UNIX"));
}
