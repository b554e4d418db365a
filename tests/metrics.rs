//! `GET /metrics` (SPEC 10, issue 17): exact counter values after known traffic, 404
//! for other paths, a slow or silent HTTP client cut within seconds, and the output
//! accepted by an independent OpenMetrics parser (Python's prometheus_client).
mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

fn metrics_server(toml: &str) -> TestServer {
    TestServer::with_toml(&format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{toml}"))
}

fn metrics_addr(s: &TestServer) -> SocketAddr {
    s.handle.metrics_addr().expect("metrics endpoint bound")
}

/// One HTTP exchange: (status line, header block, body).
fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

fn scrape(s: &TestServer) -> String {
    let (status, headers, body) = http(
        metrics_addr(s),
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\
         Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains(
            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("Content-Length: {}", body.len())),
        "{headers}"
    );
    body
}

/// The value of the sample line `series` (name with labels, exactly as exposed).
fn value(body: &str, series: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .to_string()
}

#[test]
fn scrape_after_known_traffic_has_exact_counters() {
    let s = metrics_server("[policy]\naccept_domains = [\"y.test\"]\n");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<c@z.test>", 550);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: t\r\n\r\nhello\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<d@elsewhere.test>", 550);
    c.ok("QUIT", 221);
    wait_until("session ended", || s.handle.stats().connections_active == 0);
    let stored = s.stored();
    assert_eq!(stored.len(), 1);

    let body = scrape(&s);
    for (series, want) in [
        ("mailer_messages_accepted_total", "1".to_string()),
        ("mailer_bytes_accepted_total", stored[0].1.len().to_string()),
        ("mailer_replies_total{code=\"550\"}", "2".into()),
        // EHLO, MAIL, RCPT, end of data, MAIL.
        ("mailer_replies_total{code=\"250\"}", "5".into()),
        ("mailer_replies_total{code=\"220\"}", "1".into()),
        ("mailer_replies_total{code=\"221\"}", "1".into()),
        ("mailer_replies_total{code=\"354\"}", "1".into()),
        ("mailer_connections_total", "1".into()),
        ("mailer_connections_active", "0".into()),
        ("mailer_workers", "8".into()),
        ("mailer_auth_failures_total", "0".into()),
        (
            "mailer_connections_refused_total{reason=\"per_ip_limit\"}",
            "0".into(),
        ),
        (
            "mailer_connections_refused_total{reason=\"busy\"}",
            "0".into(),
        ),
        ("mailer_spool_commit_seconds_count", "1".into()),
    ] {
        assert_eq!(value(&body, series), want, "{series}");
    }
    assert!(body.contains("# TYPE mailer_spool_commit_seconds histogram\n"));
    assert!(body.contains("# TYPE mailer_milter_actions counter\n"));
    assert!(body.ends_with("# EOF\n"), "{body}");
    // A second scrape sees the same counts (scraping changes nothing).
    assert_eq!(
        value(&scrape(&s), "mailer_replies_total{code=\"550\"}"),
        "2"
    );
}

#[test]
fn refusals_by_reason_and_auth_failures_are_counted() {
    let hash = mailer::auth::hash_password(b"right").unwrap();
    let s = TestServer::start(Opts {
        toml: format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [auth]\nallow_plaintext = true\nusers = [{{ name = \"alice\", password_hash = {hash:?} }}]\n"
        ),
        server_extra: "max_connections_per_ip = 1".into(),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    let mut second = Client::connect(s.addr);
    assert_eq!(second.reply().0, 421);
    // AUTH PLAIN \0alice\0wrong
    c.ok("AUTH PLAIN AGFsaWNlAHdyb25n", 535);
    c.ok("AUTH PLAIN AGFsaWNlAHdyb25n", 535);
    c.ok("QUIT", 221);
    wait_until("session ended", || s.handle.stats().connections_active == 0);
    let body = scrape(&s);
    assert_eq!(
        value(
            &body,
            "mailer_connections_refused_total{reason=\"per_ip_limit\"}"
        ),
        "1"
    );
    assert_eq!(value(&body, "mailer_auth_failures_total"), "2");
    assert_eq!(value(&body, "mailer_replies_total{code=\"421\"}"), "1");
}

#[test]
fn milter_actions_from_the_public_counter() {
    let s = metrics_server("");
    mailer::metrics::milter_action("opendkim-test", "accept");
    mailer::metrics::milter_action("opendkim-test", "accept");
    mailer::metrics::milter_action("rspamd-test", "reject");
    let body = scrape(&s);
    assert_eq!(
        value(
            &body,
            "mailer_milter_actions_total{milter=\"opendkim-test\",action=\"accept\"}"
        ),
        "2"
    );
    assert_eq!(
        value(
            &body,
            "mailer_milter_actions_total{milter=\"rspamd-test\",action=\"reject\"}"
        ),
        "1"
    );
}

#[test]
fn other_paths_and_methods_are_refused() {
    let s = metrics_server("");
    let addr = metrics_addr(&s);
    for path in ["/", "/metrics/", "/metricsx", "/favicon.ico"] {
        let (status, _, body) = http(addr, &format!("GET {path} HTTP/1.1\r\n\r\n"));
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{path}");
        assert_eq!(body, "not found; try /metrics\n");
    }
    let (status, _, _) = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    // A query string does not matter.
    let (status, _, _) = http(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
}

/// Waits (bounded) for the server to close `tcp`; returns how long that took.
fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Duration {
    let began = Instant::now();
    tcp.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return began.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return began.elapsed(),
            Err(e) => panic!("not closed within {limit:?}: {e}"),
        }
    }
}

#[test]
fn slow_and_silent_http_clients_are_cut_within_seconds() {
    let s = metrics_server("");
    let addr = metrics_addr(&s);
    let mut silent = TcpStream::connect(addr).unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(6));
    assert!(took < Duration::from_secs(4), "{took:?}");

    // A trickle: one byte every 300 ms never completes its head within the deadline.
    let mut slow = TcpStream::connect(addr).unwrap();
    let began = Instant::now();
    for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if began.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let took = began.elapsed() + closed_within(&mut slow, Duration::from_secs(6));
    assert!(took < Duration::from_secs(6), "{took:?}");

    // An endless head is cut at the size bound.
    let mut big = TcpStream::connect(addr).unwrap();
    let junk = vec![b'a'; 64 * 1024];
    let _ = big.write_all(&junk);
    closed_within(&mut big, Duration::from_secs(6));

    // The endpoint still answers, and SMTP was never affected.
    scrape(&s);
    s.ehlo().ok("QUIT", 221);
}

/// A Python with prometheus_client (Debian: python3-prometheus-client).
fn python_with_prometheus_client() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A metrics server that has stored one message in one finished session.
fn server_after_one_message() -> TestServer {
    let s = metrics_server("");
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<a@x.test>", 250);
    c.ok("RCPT TO:<b@y.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: t\r\n\r\nhello\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    c.ok("QUIT", 221);
    wait_until("session ended", || s.handle.stats().connections_active == 0);
    s
}

#[test]
fn output_parses_as_openmetrics() {
    let s = server_after_one_message();
    // A family without samples is left out by the parser: give it one.
    mailer::metrics::milter_action("parser-test", "accept");
    let body = scrape(&s);
    let py = python_with_prometheus_client().expect(
        "python3 with prometheus_client (.ci/install-packages installs python3-prometheus-client)",
    );
    let path = s.dir.path().join("scrape.txt");
    std::fs::write(&path, &body).unwrap();
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
for name in ["mailer_connections", "mailer_connections_active", "mailer_connections_refused",
             "mailer_messages_accepted", "mailer_bytes_accepted", "mailer_replies",
             "mailer_auth_failures", "mailer_milter_actions", "mailer_spool_commit_seconds"]:
    assert name in fams, name
assert fams["mailer_spool_commit_seconds"].type == "histogram"
acc = [s.value for s in fams["mailer_messages_accepted"].samples if s.name.endswith("_total")]
print("accepted", float(acc[0]))
"#;
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "accepted 1.0\n");
}

/// Without an OpenMetrics `Accept`, the endpoint answers the Prometheus text format
/// 0.0.4, which `promtool check metrics` (Debian's prometheus package) accepts whole.
#[test]
fn plain_scrape_is_prometheus_text_that_promtool_accepts() {
    let s = server_after_one_message();
    let (status, headers, body) = http(
        metrics_addr(&s),
        "GET /metrics HTTP/1.0\r\nAccept: */*\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{headers}"
    );
    assert!(
        body.contains("# TYPE mailer_messages_accepted_total counter\n"),
        "{body}"
    );
    assert_eq!(value(&body, "mailer_messages_accepted_total"), "1");
    assert!(!body.contains("# EOF"), "{body}");
    let path = s.dir.path().join("scrape.prom");
    std::fs::write(&path, &body).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("promtool check metrics < \"$1\"")
        .arg("sh")
        .arg(&path)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "promtool check metrics (Debian package prometheus, .ci/install-packages installs it):\n{}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every series the shipped Grafana dashboard queries is one the endpoint exposes.
#[test]
fn grafana_dashboard_queries_exposed_series() {
    let s = metrics_server("");
    mailer::metrics::milter_action("dashboard-test", "accept");
    s.ehlo().ok("QUIT", 221);
    wait_until("session ended", || s.handle.stats().connections_active == 0);
    let body = scrape(&s);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 7);
    let mut names = Vec::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("mailer_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
    }
    assert!(!names.is_empty());
    for n in names {
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("{n} ")) || l.starts_with(&format!("{n}{{"))),
            "the dashboard queries {n}, not in:\n{body}"
        );
    }
}
