//! `GET /metrics` (SPEC 10): the server's counters in the OpenMetrics text format
//! (which Prometheus scrapes natively), encoded by prometheus-client and served by a
//! few lines of std HTTP on a thread of its own, never on a session worker.
//!
//! The HTTP side is deliberately tiny: one request per connection, the request head
//! bounded in bytes ([`MAX_HEAD`]) and in time ([`REQUEST_DEADLINE`], the whole head,
//! not each read), then one response and close. A silent or slow scraper is cut after
//! the deadline; it can delay the next scrape by at most that long.

use crate::stats::Stats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a client may take to send its whole request head.
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// The largest request head read (request line and header fields).
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// The media type of the OpenMetrics text format (OpenMetrics 1.0, section 3.1).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The classic Prometheus text format, served unless the scraper asks for OpenMetrics
/// (as Prometheus itself does in its `Accept` header); promtool and older scrapers
/// read only this one.
pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus text format 0.0.4 from the OpenMetrics text prometheus-client writes:
/// a counter's `# HELP`/`# TYPE` lines name its `_total` series (0.0.4 has no family
/// name apart from the series), and the OpenMetrics-only `# UNIT` and `# EOF` go.
pub(crate) fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 256);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether the request head asks for OpenMetrics (`Accept: application/openmetrics-text`).
fn wants_openmetrics(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    })
}

/// Milter verdicts by milter name and action, process-wide: milter clients live
/// inside hooks, which do not see a server's [`Stats`].
static MILTER_ACTIONS: Mutex<BTreeMap<(String, String), u64>> = Mutex::new(BTreeMap::new());

/// Counts one milter verdict (`accept`, `reject`, `tempfail`, `discard`,
/// `quarantine`, `replycode`, `default_action`...) for `mailer_milter_actions_total`.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn milter_action(milter: &str, action: &str) {
    let mut m = MILTER_ACTIONS.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry((milter.to_string(), action.to_string()))
        .or_insert(0) += 1;
}

type Labels = Vec<(String, String)>;

fn counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    reg.register(name, help, g);
}

/// The exposition of `stats` (and the process-wide milter counts) as text.
pub(crate) fn render(stats: &Stats, workers: usize) -> String {
    let snap = stats.snapshot();
    let mut reg = Registry::default();
    // prometheus-client appends `_total` to counter names (OpenMetrics 1.0).
    counter(
        &mut reg,
        "mailer_connections",
        "Connections handed to a session worker",
        snap.connections_total,
    );
    gauge(
        &mut reg,
        "mailer_connections_active",
        "Sessions being served now",
        snap.connections_active,
    );
    gauge(
        &mut reg,
        "mailer_workers",
        "Session worker threads (server.workers)",
        workers as u64,
    );
    let refused = Family::<Labels, Counter>::default();
    for (reason, n) in &snap.refused_by_reason {
        refused
            .get_or_create(&vec![("reason".into(), reason.to_string())])
            .inc_by(*n);
    }
    reg.register(
        "mailer_connections_refused",
        "Connections refused with 421 before the greeting, by reason",
        refused,
    );
    counter(
        &mut reg,
        "mailer_messages_accepted",
        "Messages acknowledged with 250 after a durable commit",
        snap.messages_accepted,
    );
    counter(
        &mut reg,
        "mailer_bytes_accepted",
        "Bytes of accepted messages as stored",
        snap.bytes_accepted,
    );
    let replies = Family::<Labels, Counter>::default();
    for (code, n) in &snap.replies {
        replies
            .get_or_create(&vec![("code".into(), code.to_string())])
            .inc_by(*n);
    }
    reg.register("mailer_replies", "SMTP replies sent, by code", replies);
    counter(
        &mut reg,
        "mailer_auth_failures",
        "Failed AUTH attempts (535 replies)",
        snap.replies.get(&535).copied().unwrap_or(0),
    );
    let milters = Family::<Labels, Counter>::default();
    for ((milter, action), n) in MILTER_ACTIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        milters
            .get_or_create(&vec![
                ("milter".into(), milter.clone()),
                ("action".into(), action.clone()),
            ])
            .inc_by(*n);
    }
    reg.register(
        "mailer_milter_actions",
        "Milter verdicts, by milter and action",
        milters,
    );
    gauge(
        &mut reg,
        "mailer_spool_queue_depth",
        "Messages between the end of their data and their ack",
        snap.queue_depth,
    );
    reg.register(
        "mailer_spool_commit_seconds",
        "Time from the end of a message's data to its durable ack",
        stats.commit_seconds.clone(),
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        // Writing to a String fails only on a bug in an encoder.
        log::error!("metrics: cannot encode: {e}");
    }
    out
}

/// Starts the endpoint on its own thread; it ends when `stop` is set and a
/// connection wakes it.
pub(crate) fn spawn(
    listener: TcpListener,
    stats: Arc<Stats>,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(tcp) => {
                        if let Err(e) = serve_one(tcp, &stats, workers) {
                            log::debug!("metrics: request failed: {e}");
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        log::warn!("metrics: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
}

/// Reads the request head within the deadline and the size bound: `Ok(None)` when
/// the client was too slow, sent too much, or closed early.
fn read_head(tcp: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() > MAX_HEAD {
            return Ok(None);
        }
        tcp.set_read_timeout(Some(left))?;
        match tcp.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
}

fn serve_one(mut tcp: TcpStream, stats: &Stats, workers: usize) -> io::Result<()> {
    tcp.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let Some(head) = read_head(&mut tcp)? else {
        let _ = tcp.shutdown(std::net::Shutdown::Both);
        return Ok(());
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") if wants_openmetrics(&head) => {
            ("200 OK", CONTENT_TYPE, render(stats, workers))
        }
        ("GET", "/metrics") => (
            "200 OK",
            TEXT_CONTENT_TYPE,
            to_prometheus_text(&render(stats, workers)),
        ),
        (_, "/metrics") => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(response.as_bytes())?;
    tcp.flush()?;
    // Read what the client may still send (nothing, normally) so that close does not
    // turn into a reset that could destroy the response in flight.
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_named_as_specified() {
        let stats = Stats::default();
        stats.count_reply(250);
        stats.count_reply(550);
        stats.count_reply(550);
        stats.count_reply(535);
        stats.count_refusal("Error: server busy, try again later");
        milter_action("unit-test-milter", "reject");
        let text = render(&stats, 8);
        for line in [
            "mailer_connections_total 0",
            "mailer_connections_active 0",
            "mailer_workers 8",
            "mailer_connections_refused_total{reason=\"busy\"} 1",
            "mailer_connections_refused_total{reason=\"per_ip_limit\"} 0",
            "mailer_messages_accepted_total 0",
            "mailer_bytes_accepted_total 0",
            "mailer_replies_total{code=\"250\"} 1",
            "mailer_replies_total{code=\"550\"} 2",
            "mailer_auth_failures_total 1",
            "mailer_milter_actions_total{milter=\"unit-test-milter\",action=\"reject\"} 1",
            "mailer_spool_commit_seconds_count 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
    }
}
