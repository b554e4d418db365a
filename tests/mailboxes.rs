//! Issue 15 / SPEC 8: `[mailboxes]` over real loopback SMTP. Recipients in a mailbox
//! domain are resolved at RCPT (users, aliases, catch-all, delimiter, case, IDN) or
//! refused `550 5.1.1` while the transaction goes on; other recipients keep `[policy]`;
//! `users_file` is re-read when it changes; `check-config` validates and counts; each
//! mailbox gets its own copy naming only its recipients (invariant 9); and a SIGKILL
//! during multi-mailbox delivery loses no acknowledged copy (invariant 1).
mod common;
use common::process::{free_port, run, write_config, ChildServer};
use common::*;
use std::collections::BTreeSet;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A server with `[mailboxes]` rooted in `dir/mail`; `extra` goes inside the table,
/// `policy` is appended after it.
fn server(dir: &Path, extra: &str, policy: &str) -> TestServer {
    TestServer::with_toml(&format!(
        "[mailboxes]\nroot = {:?}\n{extra}\n{policy}\n",
        dir.join("mail").display().to_string()
    ))
}

const MAPS: &str = r#"users = ["alice@example.org", "bob@example.org", "jörg@bücher.example"]
aliases = { "postmaster@example.org" = ["alice@example.org"], "@example.net" = ["bob@example.org"] }
"#;

#[test]
fn unknown_user_is_refused_at_rcpt_and_the_transaction_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), MAPS, "");
    let mut c = s.ehlo();
    // SMTPUTF8 (RFC 6531) for the U-label recipient below.
    c.ok("MAIL FROM:<sender@remote.test> SMTPUTF8", 250);
    assert_eq!(
        c.cmd("RCPT TO:<nobody@example.org>"),
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<Nobody+x@EXAMPLE.ORG>"),
        "550 5.1.1 <Nobody+x@EXAMPLE.ORG>: Recipient address rejected: User unknown\r\n"
    );
    // The same transaction goes on with the recipients that exist.
    for ok in [
        "alice@example.org",
        "ALICE+lists@Example.Org",
        "postmaster@example.org",
        "anyone@example.net",
        "jörg@xn--bcher-kva.example",
        "Jörg@BÜCHER.example",
        "someone@elsewhere.test",
    ] {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{ok}>")),
            "250 2.1.5 Ok\r\n",
            "{ok}"
        );
    }
    // A path-like local part never resolves, even where a catch-all would match.
    assert_eq!(
        c.cmd("RCPT TO:<\"../bob\"@example.net>"),
        "550 5.1.1 <\"../bob\"@example.net>: Recipient address rejected: User unknown\r\n"
    );
    c.ok("DATA", 354);
    c.send_raw(b"Subject: t\r\n\r\nhello\r\n.\r\n");
    let (code, _) = c.reply();
    assert_eq!(code, 250);
    c.ok("QUIT", 221);
}

#[test]
fn mailbox_domains_need_no_accept_domains_and_others_keep_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(
        dir.path(),
        MAPS,
        "[policy]\naccept_domains = [\"accepted.test\"]\n",
    );
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<sender@remote.test>", 250);
    c.ok("RCPT TO:<alice@example.org>", 250);
    c.ok("RCPT TO:<x@accepted.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>"),
        "550 5.7.1 <x@elsewhere.test>: Relay access denied\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<carol@example.org>"),
        "550 5.1.1 <carol@example.org>: Recipient address rejected: User unknown\r\n"
    );
    c.ok("RSET", 250);
    c.ok("QUIT", 221);
}

#[test]
fn users_file_changes_are_picked_up_and_a_broken_file_keeps_the_old_maps() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "# the users\ndave@example.com\n").unwrap();
    let s = server(
        dir.path(),
        &format!("users_file = {:?}\n", users.display().to_string()),
        "",
    );
    let rcpt = |who: &str| -> String {
        let mut c = s.ehlo();
        c.ok("MAIL FROM:<s@remote.test>", 250);
        let r = c.cmd(&format!("RCPT TO:<{who}>"));
        c.ok("QUIT", 221);
        r
    };
    assert_eq!(rcpt("dave@example.com"), "250 2.1.5 Ok\r\n");
    assert!(rcpt("erin@example.com").starts_with("550 5.1.1 "));
    std::fs::write(&users, "dave@example.com\nerin@example.com # new\n").unwrap();
    wait_until("erin added", || {
        rcpt("erin@example.com").starts_with("250 ")
    });
    // A broken line: the maps in use stay (dave and erin still exist).
    std::fs::write(&users, "dave@example.com\nnot an address\n").unwrap();
    // Nothing changes, so there is no condition to wait for: watch for longer than two
    // polls of the watcher (1 s each) that the answer stays. (The unit tests check the
    // same rule without timing.)
    let until = std::time::Instant::now() + std::time::Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        assert_eq!(rcpt("erin@example.com"), "250 2.1.5 Ok\r\n");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    std::fs::write(&users, "dave@example.com\n").unwrap();
    wait_until("erin removed", || {
        rcpt("erin@example.com").starts_with("550 ")
    });
}

#[test]
fn check_config_counts_the_maps_and_refuses_loops_and_unsafe_users() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "carol@example.org\n").unwrap();
    let write = |maps: &str| {
        let p = dir.path().join("config.toml");
        std::fs::write(
            &p,
            format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\n[spool]\ndir = {:?}\n\
                 [mailboxes]\nroot = {:?}\n{maps}",
                dir.path().join("spool").display().to_string(),
                dir.path().join("mail").display().to_string(),
            ),
        )
        .unwrap();
        p.display().to_string()
    };
    let cfg = write(&format!(
        "{MAPS}users_file = {:?}\n",
        users.display().to_string()
    ));
    let out = run(&["check-config", "--config", &cfg], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("\n# mailboxes: 4 users, 2 aliases, 3 domains\n"),
        "{}",
        out.stdout
    );
    // RFC 5321 4.5.1: a domain without postmaster is worth a warning, not a refusal.
    assert!(
        out.stderr.contains(
            "warning: mailboxes: postmaster@xn--bcher-kva.example is neither a user nor an alias"
        ),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("postmaster@example.org"),
        "{}",
        out.stderr
    );

    let cfg = write(
        "users = [\"a@x.test\"]\naliases = { \"b@x.test\" = [\"c@x.test\"], \"c@x.test\" = [\"b@x.test\"] }\n",
    );
    let out = run(&["check-config", "--config", &cfg], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("alias loop"), "{}", out.stderr);

    let cfg = write("users = [\"a@x.test\"]\naliases = { \"b@x.test\" = [\"typo@x.test\"] }\n");
    let out = run(&["check-config", "--config", &cfg], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("typo@x.test"), "{}", out.stderr);

    let cfg = write("users = [\"\\\"../etc\\\"@x.test\"]\n");
    let out = run(&["check-config", "--config", &cfg], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("mailboxes.users") && out.stderr.contains(":7:"),
        "{}",
        out.stderr
    );

    std::fs::write(&users, "carol@example.org\n\nbad line here\n").unwrap();
    let cfg = write(&format!("users_file = {:?}\n", users.display().to_string()));
    let out = run(&["check-config", "--config", &cfg], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains(&format!("{}:3: ", users.display())),
        "{}",
        out.stderr
    );
}

#[test]
fn the_library_builder_refuses_what_check_config_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mailer::Config::from_toml(
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[mailboxes]\nroot = {:?}\n\
             users_file = {:?}\n",
            dir.path().join("mail").display().to_string(),
            dir.path().join("missing").display().to_string(),
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let err = match mailer::Server::builder(cfg).build() {
        Ok(_) => panic!("built with a missing users_file"),
        Err(e) => e,
    };
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

/// The files in a mailbox's `new/` (sorted by name).
fn mailbox(dir: &Path, domain: &str, local: &str) -> Vec<Vec<u8>> {
    read_maildir(&dir.join("mail").join(domain).join(local))
        .into_iter()
        .map(|(_, b)| b)
        .collect()
}

/// Splits off everything up to and including the `Received:` field (two lines).
fn head_and_body(file: &[u8]) -> (String, Vec<u8>) {
    let text = String::from_utf8_lossy(file);
    let at = text.find("Received: ").expect("Received:");
    let id_line = text[at..].find("\r\n").unwrap() + 2;
    let end = at + id_line + text[at + id_line..].find("\r\n").unwrap() + 2;
    (text[..end].to_string(), file[end..].to_vec())
}

const BODY: &[u8] =
    b"Subject: privacy\r\nTo: undisclosed-recipients:;\r\n\r\nfor your eyes only\r\n";

/// One message with [`BODY`] to `rcpts` (each must be accepted); the final reply.
fn deliver(s: &TestServer, rcpts: &[&str]) -> String {
    let mut c = s.ehlo();
    let utf8 = rcpts.iter().any(|r| !r.is_ascii());
    // SMTPUTF8 (RFC 6531) only when needed: it changes the Received: protocol.
    let params = if utf8 { " SMTPUTF8" } else { "" };
    c.ok(&format!("MAIL FROM:<sender@remote.test>{params}"), 250);
    for r in rcpts {
        c.ok(&format!("RCPT TO:<{r}>"), 250);
    }
    c.ok("DATA", 354);
    c.send_raw(BODY);
    c.send_raw(b".\r\n");
    let r = c.reply().1;
    c.ok("QUIT", 221);
    r
}

#[test]
fn two_mailboxes_get_two_copies_each_naming_only_its_own_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), MAPS, "");
    let r = deliver(&s, &["alice@example.org", "Bob+x@example.org"]);
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    let id = queue_id(&r);
    for (local, rcpt) in [("alice", "alice@example.org"), ("bob", "Bob+x@example.org")] {
        let files = mailbox(dir.path(), "example.org", local);
        assert_eq!(files.len(), 1, "{local}");
        let (head, body) = head_and_body(&files[0]);
        assert!(
            head.starts_with(&format!(
                "Delivered-To: {local}@example.org\r\nReturn-Path: <sender@remote.test>\r\n\
                 X-Original-To: {rcpt}\r\nReceived: from client.test ([127.0.0.1]) by mx.test with ESMTP\r\n"
            )),
            "{head}"
        );
        assert!(head.contains(&format!(" id {id} ; ")), "{head}");
        // Invariant 9: the other recipient appears nowhere in this copy.
        let other = if local == "alice" { "bob" } else { "alice" };
        assert!(!head.to_ascii_lowercase().contains(other), "{head}");
        assert_eq!(body, BODY);
    }
    assert!(s.stored().is_empty(), "nothing for spool.dir");
}

#[test]
fn an_alias_and_a_direct_recipient_of_one_mailbox_give_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), MAPS, "");
    let r = deliver(
        &s,
        &[
            "postmaster@example.org",
            "alice@example.org",
            "ALICE+tag@example.org",
        ],
    );
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    let files = mailbox(dir.path(), "example.org", "alice");
    assert_eq!(files.len(), 1);
    let (head, body) = head_and_body(&files[0]);
    assert!(
        head.starts_with(
            "Delivered-To: alice@example.org\r\nReturn-Path: <sender@remote.test>\r\n\
             X-Original-To: postmaster@example.org\r\nX-Original-To: alice@example.org\r\n\
             X-Original-To: ALICE+tag@example.org\r\nReceived: "
        ),
        "{head}"
    );
    assert_eq!(body, BODY);
    assert!(mailbox(dir.path(), "example.org", "bob").is_empty());
}

#[test]
fn mailbox_and_spool_recipients_are_stored_in_each_with_their_own_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), &format!("{MAPS}\n"), "");
    let r = deliver(
        &s,
        &[
            "outside@elsewhere.test",
            "anyone@example.net",
            "jörg@bücher.example",
        ],
    );
    assert!(r.starts_with("250 2.0.0 "), "{r}");
    let spool = s.stored();
    assert_eq!(spool.len(), 1);
    let (head, body) = head_and_body(&spool[0].1);
    assert!(
        head.starts_with(
            "Return-Path: <sender@remote.test>\r\nX-Original-To: outside@elsewhere.test\r\nReceived: "
        ),
        "{head}"
    );
    assert_eq!(body, BODY);
    // The catch-all of example.net leads to bob.
    let bob = mailbox(dir.path(), "example.org", "bob");
    assert_eq!(bob.len(), 1);
    let (head, _) = head_and_body(&bob[0]);
    assert!(
        head.contains("X-Original-To: anyone@example.net\r\n") && !head.contains("outside"),
        "{head}"
    );
    // An IDN domain's Maildir is named in its xn-- form.
    assert_eq!(
        mailbox(dir.path(), "xn--bcher-kva.example", "jörg").len(),
        1
    );
}

/// Message `idx` for the crash test: its index in the Subject, then lines derived from
/// it (1–12 KB), so a truncation or a mix-up shows.
fn crash_content(idx: u64) -> Vec<u8> {
    let mut v = format!("Subject: crash {idx}\r\n\r\n").into_bytes();
    for j in 0..(10 + idx.wrapping_mul(7919) % 300) {
        let pad = "y".repeat((j % 31) as usize);
        v.extend_from_slice(format!("message {idx} line {j} {pad}\r\n").as_bytes());
    }
    v
}

/// Three mailboxes and one recipient for `spool.dir`: one message, four directories.
const CRASH_RCPTS: [&str; 4] = ["a@m.test", "b@m.test", "c@m.test", "r@elsewhere.test"];

/// One reply's code and last line; an error once the server is gone.
fn raw_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    let reply = mailer::client::read_reply(r)?;
    let last = reply.lines.last().map_or("", |l| l.trim_end());
    Ok((reply.code, last.to_string()))
}

/// Sends messages to all of [`CRASH_RCPTS`] until the connection breaks; records the
/// index of each message that got 250.
fn crash_stream(
    addr: SocketAddr,
    next: &AtomicU64,
    acked: &Mutex<Vec<u64>>,
) -> std::io::Result<()> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = tcp.try_clone()?;
    let mut r = BufReader::new(tcp);
    raw_reply(&mut r)?;
    w.write_all(b"EHLO crash.test\r\n")?;
    raw_reply(&mut r)?;
    let mut envelope = String::from("MAIL FROM:<s@x.test>\r\n");
    for rc in CRASH_RCPTS {
        envelope.push_str(&format!("RCPT TO:<{rc}>\r\n"));
    }
    envelope.push_str("DATA\r\n");
    loop {
        let idx = next.fetch_add(1, Ordering::SeqCst);
        w.write_all(envelope.as_bytes())?;
        for want in [250, 250, 250, 250, 250, 354] {
            let (code, text) = raw_reply(&mut r)?;
            if code != want {
                return Err(std::io::Error::other(text));
            }
        }
        let mut wire = crash_content(idx);
        wire.extend_from_slice(b".\r\n");
        w.write_all(&wire)?;
        if raw_reply(&mut r)?.0 != 250 {
            return Ok(());
        }
        acked.lock().unwrap().push(idx);
    }
}

/// The indexes stored whole in `maildir/new`; panics on a file that is not a whole
/// message for exactly `rcpt`.
fn whole_messages(maildir: &Path, rcpt: &str, when: &str) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    for (name, bytes) in read_maildir(maildir) {
        let (head, body) = head_and_body(&bytes);
        assert!(
            head.contains(&format!("X-Original-To: {rcpt}\r\nReceived: ")),
            "{when}: {name}: {head}"
        );
        assert_eq!(
            head.matches("X-Original-To:").count(),
            1,
            "{when}: {name}: {head}"
        );
        let text = String::from_utf8_lossy(&body);
        let idx: u64 = text
            .strip_prefix("Subject: crash ")
            .and_then(|t| t[..t.find("\r\n")?].parse().ok())
            .unwrap_or_else(|| panic!("{when}: {name} is not a whole message"));
        assert!(
            body == crash_content(idx),
            "{when}: {name}: message {idx} is partial"
        );
        assert!(
            seen.insert(idx),
            "{when}: message {idx} twice in {}",
            maildir.display()
        );
    }
    seen
}

#[test]
fn sigkill_during_multi_mailbox_delivery_loses_no_acknowledged_copy() {
    const ROUNDS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let root = dir.path().join("mail");
    let maps = format!(
        "[mailboxes]\nroot = {:?}\nusers = [\"a@m.test\", \"b@m.test\", \"c@m.test\"]\n",
        root.display().to_string()
    );
    let dirs: Vec<(PathBuf, &str)> = vec![
        (root.join("m.test/a"), CRASH_RCPTS[0]),
        (root.join("m.test/b"), CRASH_RCPTS[1]),
        (root.join("m.test/c"), CRASH_RCPTS[2]),
        (spool.clone(), CRASH_RCPTS[3]),
    ];
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let mut rng = 0xC0FFEE_u64;
    for round in 0..=ROUNDS {
        let cfg = write_config(dir.path(), free_port(), &spool, "", &maps);
        let mut p = ChildServer::start(&cfg, &[]);
        let addr = p.ready(1)[0];
        let check = |when: &str| {
            for (d, rcpt) in &dirs {
                let stored = whole_messages(d, rcpt, when);
                for idx in acked.lock().unwrap().iter() {
                    assert!(
                        stored.contains(idx),
                        "{when}: message {idx} got 250 but is not in {}",
                        d.display()
                    );
                }
            }
        };
        check(&format!("after restart {round}"));
        // A greeting means the start is over: debris in every tmp/ is gone.
        for (d, _) in &dirs {
            let left: Vec<_> = std::fs::read_dir(d.join("tmp"))
                .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "round {round}: debris in {}: {left:?}",
                d.display()
            );
        }
        if round == ROUNDS {
            p.signal("TERM");
            assert!(p
                .wait_exit(Duration::from_secs(10))
                .expect("stop")
                .success());
            break;
        }
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (next, acked) = (Arc::clone(&next), Arc::clone(&acked));
                std::thread::spawn(move || {
                    let _ = crash_stream(addr, &next, &acked);
                })
            })
            .collect();
        // xorshift: a different, reproducible moment each round (100–800 ms in).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(100 + rng % 700));
        p.signal("KILL");
        assert!(!p
            .wait_exit(Duration::from_secs(10))
            .expect("killed")
            .success());
        for c in clients {
            c.join().unwrap();
        }
        check(&format!("after kill {round}"));
    }
    let total = acked.lock().unwrap().len();
    eprintln!("{total} four-copy messages acknowledged over {ROUNDS} crashes");
    assert!(
        total >= ROUNDS,
        "too few messages got through to mean anything"
    );
}

#[test]
fn an_embedder_can_use_the_check_and_the_router_without_the_config_table() {
    use mailer::config::MailboxesConfig;
    use mailer::mailboxes::{Mailboxes, RecipientCheck};
    let dir = tempfile::tempdir().unwrap();
    let maps = MailboxesConfig {
        root: dir.path().join("mail"),
        users: vec!["carol@example.com".into()],
        ..MailboxesConfig::default()
    };
    let mb = Arc::new(Mailboxes::new(&maps, &dir.path().join("spool")).unwrap());
    let (check, router) = (RecipientCheck::new(Arc::clone(&mb), None), mb);
    let s = TestServer::start(Opts {
        hooks: Some(Box::new(move |b| b.hooks(check).router(router))),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    c.ok("MAIL FROM:<s@remote.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<dave@example.com>"),
        "550 5.1.1 <dave@example.com>: Recipient address rejected: User unknown\r\n"
    );
    c.ok("RCPT TO:<Carol@Example.com>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: embedded\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let files = mailbox(dir.path(), "example.com", "carol");
    assert_eq!(files.len(), 1);
    assert!(files[0].starts_with(b"Delivered-To: carol@example.com\r\n"));
}

/// Dovecot writes into a mailbox's `tmp/` too (IMAP APPEND, COPY): its files there,
/// named `<secs>.M<usec>P<pid>.<host>`, must survive mailer's start and its first
/// delivery into that mailbox. mailer's own debris there is removed.
#[test]
fn dovecot_files_in_a_mailbox_tmp_survive_mailers_start_and_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("mail/example.org/alice/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let dovecot = tmp.join("1700000000.M1P1.imap.host");
    let debris = tmp.join("1700000000.M1P4294967295Rab12cd34Q1C0.mx.test");
    std::fs::write(&dovecot, b"an APPEND in flight").unwrap();
    std::fs::write(&debris, b"partial").unwrap();
    let s = server(dir.path(), MAPS, "");
    assert!(!debris.exists(), "mailer's debris is cleared at start");
    assert!(deliver(&s, &["alice@example.org"]).starts_with("250 "));
    assert!(dovecot.exists(), "Dovecot's file in tmp/ was removed");
}

/// SPEC 2: SIGHUP re-reads `[mailboxes]` from the config file; a table that does not
/// load is logged at ERROR and the maps in use stay.
#[test]
fn sighup_reloads_the_maps_and_a_broken_table_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let port = free_port();
    let maps = |users: &str, aliases: &str| {
        format!(
            "[mailboxes]\nroot = {:?}\nusers = [{users}]\naliases = {{ {aliases} }}\n",
            dir.path().join("mail").display().to_string()
        )
    };
    let cfg = write_config(dir.path(), port, &spool, "", &maps("\"a@m.test\"", ""));
    let mut p = ChildServer::start(&cfg, &[]);
    let addr = p.ready(1)[0];
    let rcpt = |who: &str| -> String {
        let mut c = Client::connect(addr);
        c.reply();
        c.ok("EHLO client.test", 250);
        c.ok("MAIL FROM:<s@remote.test>", 250);
        let r = c.cmd(&format!("RCPT TO:<{who}>"));
        c.ok("QUIT", 221);
        r
    };
    assert!(rcpt("b@m.test").starts_with("550 5.1.1 "));
    write_config(
        dir.path(),
        port,
        &spool,
        "",
        &maps("\"a@m.test\", \"b@m.test\"", ""),
    );
    p.signal("HUP");
    p.wait_log("mailboxes: loaded 2 users", 1);
    assert_eq!(rcpt("b@m.test"), "250 2.1.5 Ok\r\n");
    // A loop: refused, logged, and b@ still exists.
    write_config(
        dir.path(),
        port,
        &spool,
        "",
        &maps(
            "\"a@m.test\"",
            "\"x@m.test\" = [\"y@m.test\"], \"y@m.test\" = [\"x@m.test\"]",
        ),
    );
    p.signal("HUP");
    p.wait_log("alias loop", 1);
    assert_eq!(rcpt("b@m.test"), "250 2.1.5 Ok\r\n");
    assert!(p.log().contains("ERROR"), "{}", p.log());
    p.signal("TERM");
    assert!(p
        .wait_exit(Duration::from_secs(10))
        .expect("stop")
        .success());
}
