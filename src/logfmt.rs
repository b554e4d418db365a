//! The log line format of the binary (env_logger with a custom formatter).
//!
//! - Every line is one line: control characters (C0, DEL, C1) and Unicode bidi
//!   controls are written as escapes, whatever a client managed to put into a
//!   message (a HELO name, an address, a TLS alert text). A log reader never sees
//!   a forged second line or text that renders in another order.
//! - Under systemd, when stderr is the journal stream (`JOURNAL_STREAM` names the
//!   device and inode of fd 2, see systemd.exec(5)), each line starts with its
//!   syslog priority `<N>` (sd-daemon(3)), so that `journalctl -p warning` works.
//! - Lines logged by rustls carry the session id of the worker thread that logged
//!   them, so that a TLS warning can be tied to its connection.

use log::Level;
use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Write;

thread_local! {
    /// The session the current worker thread is serving, for third-party log lines.
    static SESSION: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Marks the current thread as serving session `id` until dropped.
pub(crate) struct SessionScope(());

impl SessionScope {
    pub(crate) fn enter(id: u64) -> SessionScope {
        SESSION.with(|s| s.set(Some(id)));
        SessionScope(())
    }
}

impl Drop for SessionScope {
    fn drop(&mut self) {
        SESSION.with(|s| s.set(None));
    }
}

/// The syslog priority of a level (RFC 5424 severities: err 3, warning 4, info 6,
/// debug 7).
pub(crate) fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True for characters a log line must not carry as they are: C0 controls (line
/// breaks included), DEL, C1 controls and the bidi controls of Unicode TR 9
/// (CVE-2021-42574 "Trojan Source").
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `line` with every character of [`needs_escape`] written as `\n`, `\r`, `\t`,
/// `\xNN` (ASCII) or `\u{NNNN}`.
pub(crate) fn escape_line(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// True when `journal_stream` (the value of `JOURNAL_STREAM`, `<dev>:<ino>` in
/// decimal) names the file that stderr is. A child that inherited the variable but
/// has its stderr redirected elsewhere must not prefix priorities.
pub(crate) fn names_stderr(journal_stream: &str) -> bool {
    let Some((dev, ino)) = journal_stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        // dev_t and ino_t are u64 on Linux but narrower on some other targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Formats one record: `[<N>][TIME LEVEL target] message`, escaped.
fn format_line(journal: bool, time: &str, record: &log::Record<'_>) -> String {
    let mut line = String::with_capacity(128);
    let target = record.target();
    let _ = write!(line, "[{time} {:<5} {target}] ", record.level());
    if !target.starts_with("mailer") {
        // Third-party lines (rustls) do not know our session; the thread does.
        if let Some(id) = SESSION.with(Cell::get) {
            let _ = write!(line, "session {id}: ");
        }
    }
    let _ = write!(line, "{}", record.args());
    let escaped = escape_line(&line);
    if journal {
        format!("<{}>{escaped}\n", priority(record.level()))
    } else {
        format!("{escaped}\n")
    }
}

/// Installs the logger: `RUST_LOG` filters (default `default_filter`), lines go to
/// stderr in the format above.
pub(crate) fn init(default_filter: &str) {
    let journal = std::env::var("JOURNAL_STREAM").is_ok_and(|v| names_stderr(&v));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        // The lines carry no styles, and format_line escapes ESC and the C1 controls,
        // so a client cannot smuggle an ANSI sequence in: there is nothing for
        // env_logger to strip, and its per-byte scan for sequences (1.6 % of the
        // machine's CPU at a thousand sessions a second, bench/README.md) is skipped.
        .write_style(env_logger::WriteStyle::Always)
        .format(move |buf, record| {
            let time = buf.timestamp_millis().to_string();
            buf.write_all(format_line(journal, &time, record).as_bytes())
        })
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_are_escaped() {
        assert_eq!(escape_line("plain text"), "plain text");
        assert_eq!(
            escape_line("a\r\nb\tc\x00d\x7fe"),
            "a\\r\\nb\\tc\\x00d\\x7fe"
        );
        assert_eq!(
            escape_line("x\u{85}y\u{202e}z\u{2066}"),
            "x\\u{85}y\\u{202e}z\\u{2066}"
        );
        // Printable non-ASCII stays readable.
        assert_eq!(escape_line("grüße 日本"), "grüße 日本");
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
        assert_eq!(priority(Level::Trace), 7);
    }

    #[test]
    fn lines_are_one_line_with_optional_prefix() {
        let args = format_args!("session 1: HELO evil\r\n[forged line]");
        let rec = log::Record::builder()
            .args(args)
            .level(Level::Warn)
            .target("mailer::session")
            .build();
        let l = format_line(true, "T", &rec);
        assert_eq!(
            l,
            "<4>[T WARN  mailer::session] session 1: HELO evil\\r\\n[forged line]\n"
        );
        let l = format_line(false, "T", &rec);
        assert!(l.starts_with("[T WARN "), "{l}");
    }

    #[test]
    fn third_party_lines_carry_the_session() {
        let _scope = SessionScope::enter(42);
        let args = format_args!("Sending warning alert");
        let rec = log::Record::builder()
            .args(args)
            .level(Level::Warn)
            .target("rustls::conn")
            .build();
        assert_eq!(
            format_line(false, "T", &rec),
            "[T WARN  rustls::conn] session 42: Sending warning alert\n"
        );
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(!names_stderr(""));
        assert!(!names_stderr("x:y"));
        assert!(!names_stderr("0:0"));
        let st = rustix::fs::fstat(std::io::stderr()).expect("fstat stderr");
        assert!(names_stderr(&format!("{}:{}", st.st_dev, st.st_ino)));
    }
}
