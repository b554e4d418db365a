//! Delivery over real loopback TCP (SPEC 5, 8, 9; invariants 1, 9, 10, 11): per-mailbox
//! copies that name only their own recipients, one copy per mailbox however many
//! recipients lead there, mixed spool and mailbox delivery, all-or-nothing storage
//! faults, data-hook verdicts (added, inserted and changed fields, quarantine,
//! discard), and the content guards against forged trace headers. Stored bytes are
//! compared whole; only the date in `Received:` is masked.
mod common;
use common::*;
use mailer::delivery::{Mailbox, Router};
use mailer::hooks::{DataVerdict, Envelope, Header, HeaderChange, Hooks, SessionInfo};
use mailer::protocol::address::Address;
use mailer::spool::{Faults, Op};
use mailer::Reply;
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Mailboxes `a`, `b` in `m.test` under `root`; `alias@m.test` leads to `a`, `both@` to
/// both. Anything else is not a mailbox recipient.
struct TestRouter {
    root: PathBuf,
}

impl TestRouter {
    fn maildir(&self, local: &str) -> PathBuf {
        self.root.join("m.test").join(local)
    }
    fn mailbox(&self, local: &str) -> Mailbox {
        Mailbox {
            address: format!("{local}@m.test"),
            maildir: self.maildir(local),
        }
    }
}

impl Router for TestRouter {
    fn route(&self, rcpt: &Address) -> Option<Vec<Mailbox>> {
        if rcpt.domain() != Some("m.test") {
            return None;
        }
        Some(match rcpt.local_part() {
            "a" => vec![self.mailbox("a")],
            "b" => vec![self.mailbox("b")],
            "alias" => vec![self.mailbox("a")],
            "both" => vec![self.mailbox("a"), self.mailbox("b")],
            _ => Vec::new(),
        })
    }
}

/// Fails the `n`-th occurrence (1-based) of one storage step.
struct FailNth {
    op: Op,
    n: usize,
    seen: Mutex<usize>,
}

impl Faults for FailNth {
    fn before(&self, op: Op) -> io::Result<()> {
        if op != self.op {
            return Ok(());
        }
        let mut seen = self.seen.lock().unwrap();
        *seen += 1;
        if *seen == self.n {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

/// A data hook with a fixed verdict that records what it saw.
#[derive(Default)]
struct Verdict {
    verdict: DataVerdict,
    chunks: Mutex<Vec<u8>>,
    read: Mutex<Vec<Vec<u8>>>,
    events: Mutex<Vec<String>>,
}

/// The hook as the server owns it; the test keeps the other `Arc`.
struct Shared(Arc<Verdict>);

impl Hooks for Shared {
    fn wants_data(&self) -> bool {
        true
    }
    fn data_start(&self, _s: &SessionInfo, _e: &Envelope, q: &str) {
        self.0.events.lock().unwrap().push(format!("start {q}"));
    }
    fn data_chunk(&self, _s: &SessionInfo, _e: &Envelope, chunk: &[u8]) {
        self.0.chunks.lock().unwrap().extend_from_slice(chunk);
    }
    fn data(
        &self,
        _s: &SessionInfo,
        _e: &Envelope,
        c: &mut dyn Read,
    ) -> Result<DataVerdict, Reply> {
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        self.0.read.lock().unwrap().push(all);
        self.0.events.lock().unwrap().push("data".into());
        Ok(self.0.verdict.clone())
    }
    fn reset(&self, _s: &SessionInfo) {
        self.0.events.lock().unwrap().push("reset".into());
    }
    fn close(&self, _s: &SessionInfo) {
        self.0.events.lock().unwrap().push("close".into());
    }
}

struct Setup {
    server: TestServer,
    router: Arc<TestRouter>,
}

fn start(hook: Option<Arc<Verdict>>, faults: Option<Arc<dyn Faults>>, routed: bool) -> Setup {
    let root = tempfile::tempdir().unwrap().keep();
    let router = Arc::new(TestRouter { root });
    let r: Arc<dyn Router> = router.clone();
    let server = TestServer::start(Opts {
        hooks: Some(Box::new(move |mut b| {
            if routed {
                b = b.router(r);
            }
            if let Some(f) = faults {
                b = b.spool_faults(f);
            }
            if let Some(h) = hook {
                b = b.hooks(Shared(h));
            }
            b
        })),
        ..Opts::default()
    });
    Setup { server, router }
}

/// Sends one message by DATA; returns the final reply.
fn send(c: &mut Client, rcpts: &[&str], content: &[u8]) -> String {
    c.ok("MAIL FROM:<s@x.test>", 250);
    for r in rcpts {
        c.ok(&format!("RCPT TO:<{r}>"), 250);
    }
    c.ok("DATA", 354);
    c.send_raw(content);
    c.send_raw(b".\r\n");
    c.reply().1
}

fn queue_id(reply: &str) -> String {
    reply
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("queue id")
        .to_string()
}

/// The file's text with the `Received:` date replaced by `DATE`.
fn masked(file: &[u8]) -> String {
    let text = String::from_utf8_lossy(file).into_owned();
    let id = text.find("\r\n        id ").expect("Received id line");
    let semi = text[id..].find(" ; ").expect("date") + id;
    let end = text[semi..].find("\r\n").expect("CRLF") + semi;
    format!("{} ; DATE{}", &text[..semi], &text[end..])
}

fn received(id: &str) -> String {
    format!("Received: from client.test ([127.0.0.1]) by mx.test with ESMTP\r\n        id {id} ; DATE\r\n")
}

/// The one message in a Maildir's `new/`, masked; asserts it is alone and named by `id`.
fn only(dir: &Path, id: &str) -> String {
    let files = read_maildir(dir);
    assert_eq!(files.len(), 1, "{}: {:?}", dir.display(), files);
    assert!(files[0].0.contains(&format!(".{id}.")), "{}", files[0].0);
    masked(&files[0].1)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

const CONTENT: &[u8] = b"Subject: hi\r\n\r\nhello\r\n";

#[test]
fn two_mailboxes_get_two_copies_each_naming_only_its_own_recipient() {
    let s = start(None, None, true);
    let mut c = s.server.ehlo();
    let reply = send(&mut c, &["a@m.test", "b@m.test"], CONTENT);
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = queue_id(&reply);
    for who in ["a", "b"] {
        assert_eq!(
            only(&s.router.maildir(who), &id),
            format!(
                "Delivered-To: {who}@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: {who}@m.test\r\n{}Subject: hi\r\n\r\nhello\r\n",
                received(&id)
            )
        );
    }
    assert!(s.server.stored().is_empty(), "nothing for the spool");
}

/// One copy only: the message is written straight into the mailbox (no staging); a
/// fault there is answered 451 with nothing left in new/ or tmp/.
#[test]
fn a_single_mailbox_copy_is_written_in_place() {
    let faults: Arc<dyn Faults> = Arc::new(FailNth {
        op: Op::SyncFile,
        n: 1,
        seen: Mutex::new(0),
    });
    let s = start(None, Some(faults), true);
    let mut c = s.server.ehlo();
    let reply = send(&mut c, &["b@m.test"], CONTENT);
    assert!(reply.starts_with("451 4.3.0 "), "{reply}");
    let b = s.router.maildir("b");
    assert_eq!(count_files(&b.join("new")), 0);
    assert_eq!(count_files(&b.join("tmp")), 0);
    let reply = send(&mut c, &["b@m.test"], CONTENT);
    let id = queue_id(&reply);
    assert_eq!(
        only(&b, &id),
        format!(
            "Delivered-To: b@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: b@m.test\r\n{}Subject: hi\r\n\r\nhello\r\n",
            received(&id)
        )
    );
    assert_eq!(count_files(&s.server.spool().join("tmp")), 0);
    assert!(s.server.stored().is_empty());
}

#[test]
fn recipients_leading_to_one_mailbox_give_one_copy_naming_them_all() {
    let s = start(None, None, true);
    let mut c = s.server.ehlo();
    let reply = send(&mut c, &["alias@m.test", "a@m.test"], CONTENT);
    let id = queue_id(&reply);
    assert_eq!(
        only(&s.router.maildir("a"), &id),
        format!(
            "Delivered-To: a@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: alias@m.test\r\nX-Original-To: a@m.test\r\n{}Subject: hi\r\n\r\nhello\r\n",
            received(&id)
        )
    );
    assert_eq!(count_files(&s.router.maildir("b").join("new")), 0);
}

#[test]
fn spool_and_mailbox_recipients_are_stored_in_each() {
    let s = start(None, None, true);
    let mut c = s.server.ehlo();
    let reply = send(&mut c, &["ext@o.test", "b@m.test", "other@o.test"], CONTENT);
    let id = queue_id(&reply);
    assert_eq!(
        only(&s.server.spool(), &id),
        format!(
            "Return-Path: <s@x.test>\r\nX-Original-To: ext@o.test\r\nX-Original-To: other@o.test\r\n{}Subject: hi\r\n\r\nhello\r\n",
            received(&id)
        )
    );
    assert_eq!(
        only(&s.router.maildir("b"), &id),
        format!(
            "Delivered-To: b@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: b@m.test\r\n{}Subject: hi\r\n\r\nhello\r\n",
            received(&id)
        )
    );
    // Nothing left behind in any tmp/.
    for dir in [s.server.spool(), s.router.maildir("b")] {
        assert_eq!(count_files(&dir.join("tmp")), 0, "{}", dir.display());
    }
}

/// A fault on the second copy (creating it, or moving it into new/) stores no copy in
/// any new/, leaves no debris in tmp/, answers 451, and the session goes on.
#[test]
fn a_fault_on_the_second_copy_delivers_no_copy() {
    // Create: 1 is the staged content, 2 the copy for a, 3 the copy for b.
    for (op, n) in [(Op::Create, 3), (Op::Rename, 2), (Op::SyncFile, 2)] {
        let faults: Arc<dyn Faults> = Arc::new(FailNth {
            op,
            n,
            seen: Mutex::new(0),
        });
        let s = start(None, Some(faults), true);
        let mut c = s.server.ehlo();
        let reply = send(&mut c, &["a@m.test", "b@m.test"], CONTENT);
        assert!(reply.starts_with("451 4.3.0 "), "{op:?}: {reply}");
        for who in ["a", "b"] {
            let dir = s.router.maildir(who);
            assert_eq!(count_files(&dir.join("new")), 0, "{op:?} {who} new/");
            assert_eq!(count_files(&dir.join("tmp")), 0, "{op:?} {who} tmp/");
        }
        assert_eq!(count_files(&s.server.spool().join("tmp")), 0, "{op:?}");
        // The fault was once: the retry is delivered to both.
        let reply = send(&mut c, &["a@m.test", "b@m.test"], CONTENT);
        assert!(reply.starts_with("250 "), "{op:?}: {reply}");
        for who in ["a", "b"] {
            assert_eq!(count_files(&s.router.maildir(who).join("new")), 1);
        }
    }
}

#[test]
fn content_starting_with_white_space_gets_an_empty_line_first() {
    let forged = b" (authenticated as ceo)\r\nSubject: x\r\n\r\nbody\r\n";
    // The fast path (one file) and the staged one (a router).
    for routed in [false, true] {
        let s = start(None, None, routed);
        let mut c = s.server.ehlo();
        let reply = send(&mut c, &["ext@o.test"], forged);
        let id = queue_id(&reply);
        assert_eq!(
            only(&s.server.spool(), &id),
            format!(
                "Return-Path: <s@x.test>\r\nX-Original-To: ext@o.test\r\n{}\r\n (authenticated as ceo)\r\nSubject: x\r\n\r\nbody\r\n",
                received(&id)
            ),
            "routed: {routed}"
        );
        // BDAT, with the white space alone in the first chunk.
        c.ok("MAIL FROM:<s@x.test>", 250);
        c.ok("RCPT TO:<ext@o.test>", 250);
        c.send_raw(b"BDAT 1\r\n\t");
        assert_eq!(c.reply().0, 250);
        c.send_raw(b"BDAT 8 LAST\r\nforged\r\n");
        let reply = c.reply().1;
        let id = queue_id(&reply);
        let file = s
            .server
            .stored()
            .into_iter()
            .find(|(n, _)| n.contains(&format!(".{id}.")))
            .unwrap();
        assert!(
            masked(&file.1).ends_with(&format!("{}\r\n\tforged\r\n", received(&id))),
            "{}",
            masked(&file.1)
        );
    }
}

#[test]
fn incoming_return_path_fields_are_removed_from_the_header_section() {
    for routed in [false, true] {
        let s = start(None, None, routed);
        let mut c = s.server.ehlo();
        // BDAT chunks split the field name in the middle.
        c.ok("MAIL FROM:<s@x.test>", 250);
        c.ok("RCPT TO:<ext@o.test>", 250);
        let content: &[u8] = b"Return-Path: <forged@evil.test>\r\nSubject: s\r\nreturn-path:\r\n <folded@evil.test>\r\n\r\nReturn-Path: <kept in body>\r\n";
        for (i, piece) in [&content[..7], &content[7..40], &content[40..]]
            .iter()
            .enumerate()
        {
            let last = if i == 2 { " LAST" } else { "" };
            c.send_raw(format!("BDAT {}{last}\r\n", piece.len()).as_bytes());
            c.send_raw(piece);
            assert_eq!(c.reply().0, 250);
        }
        // DATA too.
        let reply = send(
            &mut c,
            &["ext@o.test"],
            b"X-A: 1\r\nRETURN-PATH : <x@evil.test>\r\nX-B: 2\r\n\r\nbody\r\n",
        );
        let id2 = queue_id(&reply);
        let stored = s.server.stored();
        assert_eq!(stored.len(), 2, "routed: {routed}");
        let bodies: Vec<String> = stored
            .iter()
            .map(|(_, f)| {
                let m = masked(f);
                m[m.find(" ; DATE\r\n").unwrap() + 9..].to_string()
            })
            .collect();
        assert!(
            bodies.contains(&"Subject: s\r\n\r\nReturn-Path: <kept in body>\r\n".to_string()),
            "{bodies:?}"
        );
        assert!(
            bodies.contains(&"X-A: 1\r\nX-B: 2\r\n\r\nbody\r\n".to_string()),
            "{bodies:?}"
        );
        assert!(stored.iter().any(|(n, _)| n.contains(&format!(".{id2}."))));
    }
}

#[test]
fn data_hook_sees_chunks_and_the_stored_content_and_its_edits_are_applied() {
    let hook = Arc::new(Verdict {
        verdict: DataVerdict {
            add: vec![Header::new("X-Score", "1")],
            insert: vec![(1, Header::new("X-Inserted", "yes"))],
            change: vec![
                HeaderChange {
                    name: "subject".into(),
                    index: 1,
                    value: Some("changed".into()),
                },
                HeaderChange {
                    name: "X-Drop".into(),
                    index: 1,
                    value: None,
                },
            ],
            ..DataVerdict::default()
        },
        ..Verdict::default()
    });
    let s = start(Some(Arc::clone(&hook)), None, true);
    let mut c = s.server.ehlo();
    let content = b"Subject: old\r\nX-Drop: x\r\nFrom: f@x.test\r\n\r\n..body\r\n";
    let reply = send(&mut c, &["a@m.test", "ext@o.test"], content);
    let id = queue_id(&reply);
    let seen = b"Subject: old\r\nX-Drop: x\r\nFrom: f@x.test\r\n\r\n.body\r\n";
    assert_eq!(*hook.chunks.lock().unwrap(), seen);
    assert_eq!(*hook.read.lock().unwrap(), [seen.to_vec()]);
    let tail =
        "X-Score: 1\r\nSubject: changed\r\nX-Inserted: yes\r\nFrom: f@x.test\r\n\r\n.body\r\n";
    assert_eq!(
        only(&s.router.maildir("a"), &id),
        format!(
            "Delivered-To: a@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: a@m.test\r\n{}{tail}",
            received(&id)
        )
    );
    assert_eq!(
        only(&s.server.spool(), &id),
        format!(
            "Return-Path: <s@x.test>\r\nX-Original-To: ext@o.test\r\n{}{tail}",
            received(&id)
        )
    );
    c.ok("RSET", 250);
    c.ok("QUIT", 221);
    wait_until("close hook", || {
        hook.events.lock().unwrap().last().map(String::as_str) == Some("close")
    });
    assert_eq!(
        *hook.events.lock().unwrap(),
        [
            format!("start {id}"),
            "data".into(),
            "reset".into(),
            "close".into()
        ]
    );
}

#[test]
fn quarantine_goes_to_the_quarantine_folder_and_discard_stores_nothing() {
    let hook = Arc::new(Verdict {
        verdict: DataVerdict {
            quarantine: Some("looks bad".into()),
            ..DataVerdict::default()
        },
        ..Verdict::default()
    });
    let s = start(Some(hook), None, true);
    let mut c = s.server.ehlo();
    let reply = send(&mut c, &["b@m.test", "ext@o.test"], CONTENT);
    let id = queue_id(&reply);
    for (dir, head) in [
        (
            s.router.maildir("b"),
            "Delivered-To: b@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: b@m.test\r\n",
        ),
        (
            s.server.spool(),
            "Return-Path: <s@x.test>\r\nX-Original-To: ext@o.test\r\n",
        ),
    ] {
        assert_eq!(count_files(&dir.join("new")), 0);
        let q = dir.join(".Quarantine");
        assert!(q.join("cur").is_dir() && q.join("tmp").is_dir());
        assert_eq!(
            only(&q, &id),
            format!(
                "{head}{}X-Quarantine: looks bad\r\nSubject: hi\r\n\r\nhello\r\n",
                received(&id)
            )
        );
    }

    let hook = Arc::new(Verdict {
        verdict: DataVerdict {
            discard: true,
            ..DataVerdict::default()
        },
        ..Verdict::default()
    });
    let s = start(Some(hook), None, true);
    let mut c = s.server.ehlo();
    let reply = send(&mut c, &["b@m.test", "ext@o.test"], CONTENT);
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert!(s.server.stored().is_empty());
    assert_eq!(count_files(&s.router.maildir("b").join("new")), 0);
    assert_eq!(count_files(&s.server.spool().join("tmp")), 0);
}

/// Each stored copy is only in its own Maildir: a map of every file under the root.
#[test]
fn mailbox_copies_are_only_where_they_belong() {
    let s = start(None, None, true);
    let mut c = s.server.ehlo();
    send(&mut c, &["both@m.test"], CONTENT);
    let mut per_dir: HashMap<String, usize> = HashMap::new();
    for who in ["a", "b"] {
        let files = read_maildir(&s.router.maildir(who));
        for (_, f) in &files {
            let text = String::from_utf8_lossy(f);
            assert!(text.starts_with(&format!("Delivered-To: {who}@m.test\r\n")));
            assert!(text.contains("X-Original-To: both@m.test\r\n"));
        }
        per_dir.insert(who.into(), files.len());
    }
    assert_eq!(per_dir, HashMap::from([("a".into(), 1), ("b".into(), 1)]));
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Issue 13 / invariant 9: stored files get exactly `spool.file_mode` and the
/// directories the server creates the same bits plus x, whatever the umask.
#[test]
fn file_modes_follow_the_config_under_umask_022() {
    use rustix::fs::Mode;
    // The usual umask of a service; it would give 0644 files and 0755 directories.
    rustix::process::umask(Mode::from_raw_mode(0o022));
    for (toml, file, dir) in [("", 0o600, 0o700), ("file_mode = \"0640\"\n", 0o640, 0o750)] {
        let root = tempfile::tempdir().unwrap().keep();
        let router = Arc::new(TestRouter { root });
        let r: Arc<dyn Router> = router.clone();
        let s = TestServer::start(Opts {
            // Lands inside [spool], which the harness writes last.
            toml: toml.into(),
            hooks: Some(Box::new(move |b| b.router(r))),
            ..Opts::default()
        });
        let mut c = s.ehlo();
        send(&mut c, &["ext@o.test", "a@m.test"], CONTENT);
        // One copy only: written straight into the mailbox.
        send(&mut c, &["b@m.test"], CONTENT);
        let quarantined = s.spool().join(".Quarantine");
        let mut dirs = vec![s.spool(), router.root.join("m.test"), router.maildir("a")];
        dirs.push(router.maildir("b"));
        for d in [s.spool(), router.maildir("a"), router.maildir("b")] {
            for sub in ["tmp", "new", "cur"] {
                dirs.push(d.join(sub));
            }
        }
        for d in &dirs {
            assert_eq!(mode_of(d), dir, "{} ({toml})", d.display());
        }
        for d in [s.spool(), router.maildir("a"), router.maildir("b")] {
            let files = std::fs::read_dir(d.join("new")).unwrap();
            for f in files {
                let f = f.unwrap().path();
                assert_eq!(mode_of(&f), file, "{} ({toml})", f.display());
            }
        }
        assert!(!quarantined.exists());
    }
}

#[test]
fn a_bad_file_mode_is_a_config_error() {
    for bad in ["0666", "0700", "0755", "0400", "rw", "04600", "0602"] {
        let toml = format!("[spool]\ndir = \"/tmp/x\"\nfile_mode = \"{bad}\"\n");
        let e = mailer::Config::from_toml(&toml, Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("spool.file_mode"), "{bad}: {e}");
    }
    for good in ["0600", "0640", "0660", "0644", "640"] {
        let toml = format!("[spool]\nfile_mode = \"{good}\"\n");
        assert!(
            mailer::Config::from_toml(&toml, Path::new("t.toml")).is_ok(),
            "{good}"
        );
    }
}

/// SPEC 5: a second instance starting on a spool leaves alone the tmp/ file the
/// first one (another process) is writing, clears the dead one's debris, and both
/// deliver into the same new/.
#[test]
fn two_instances_share_one_spool() {
    use common::process::{free_port, write_config, ChildServer};
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let port = free_port();
    let cfg = write_config(dir.path(), port, &spool, "", "");
    let mut first = ChildServer::start(&cfg, &[]);
    let addr = first.ready(1)[0];
    let mut c = Client::connect(addr);
    assert_eq!(c.reply().0, 220);
    c.ok("EHLO client.test", 250);
    c.ok("MAIL FROM:<s@x.test>", 250);
    c.ok("RCPT TO:<r@o.test>", 250);
    c.ok("DATA", 354);
    c.send_raw(b"Subject: in flight\r\n\r\n");
    let tmp = spool.join("tmp");
    wait_until("the first instance's file in tmp/", || {
        count_files(&tmp) == 1
    });
    let in_flight: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let debris = [
        tmp.join(format!("1700000000.M1P{}R0badcafeQ0.mx.test", pid_max + 1)),
        tmp.join("leftover"),
    ];
    for d in &debris {
        std::fs::write(d, b"partial").unwrap();
    }
    let second = TestServer::start(Opts {
        spool: Some(spool.clone()),
        ..Opts::default()
    });
    // A greeting comes from a worker, and workers start once the spool is open.
    let mut c2 = second.ehlo();
    for d in &debris {
        assert!(!d.exists(), "{} was not cleared", d.display());
    }
    assert!(in_flight[0].exists(), "the live writer's file was removed");
    c.send_raw(b"body\r\n.\r\n");
    let (code, first_reply) = c.reply();
    assert_eq!(code, 250, "{first_reply}");
    let second_reply = send(&mut c2, &["r@o.test"], CONTENT);
    assert!(second_reply.starts_with("250 "), "{second_reply}");
    let stored = read_maildir(&spool);
    assert_eq!(stored.len(), 2);
    for id in [queue_id(&first_reply), queue_id(&second_reply)] {
        assert!(
            stored.iter().any(|(n, _)| n.contains(&format!(".{id}."))),
            "{id}"
        );
    }
    let (status, log) = first.stop();
    assert!(status.success(), "{log}");
}

/// `data_sync = "batch"` (issue 18): the writer's syncfs stands for the per-file
/// fdatasync; a failure of it fails the message everywhere, and the next one is stored.
#[test]
fn batch_data_sync_is_all_or_nothing_too() {
    let faults: Arc<dyn Faults> = Arc::new(FailNth {
        op: Op::SyncFile,
        n: 1,
        seen: Mutex::new(0),
    });
    let root = tempfile::tempdir().unwrap().keep();
    let router = Arc::new(TestRouter { root });
    let r: Arc<dyn Router> = router.clone();
    let s = TestServer::start(Opts {
        toml: "data_sync = \"batch\"\n".into(),
        hooks: Some(Box::new(move |b| b.router(r).spool_faults(faults))),
        ..Opts::default()
    });
    let mut c = s.ehlo();
    let reply = send(&mut c, &["a@m.test", "ext@o.test"], CONTENT);
    assert!(reply.starts_with("451 4.3.0 "), "{reply}");
    for dir in [s.spool(), router.maildir("a")] {
        assert_eq!(count_files(&dir.join("new")), 0);
        assert_eq!(count_files(&dir.join("tmp")), 0);
    }
    let reply = send(&mut c, &["a@m.test", "ext@o.test"], CONTENT);
    let id = queue_id(&reply);
    only(&s.spool(), &id);
    only(&router.maildir("a"), &id);
    // The fast path (no router involved) in batch mode.
    let reply = send(&mut c, &["b2@o.test"], CONTENT);
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(count_files(&s.spool().join("new")), 2);
}

/// The transaction hooks in order: a message refused for its size never reaches
/// `data` and is reset; a disconnect inside DATA resets too; `close` comes last.
#[test]
fn reset_and_close_follow_the_transaction() {
    use mailer::testing::Mem;
    let run = |input: &[u8], max: u64| {
        let hook = Arc::new(Verdict::default());
        let r = Mem {
            hooks: Arc::new(Shared(Arc::clone(&hook))),
            max_message_size: max,
            ..Mem::default()
        }
        .run(input);
        let events = hook.events.lock().unwrap().clone();
        (r.codes(), events)
    };
    let (codes, ev) = run(
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n0123456789\r\n.\r\nQUIT\r\n",
        5,
    );
    assert_eq!(codes, [220, 250, 250, 250, 354, 552, 221]);
    assert_eq!(ev, ["start MEM1", "reset", "close"]);
    let (codes, ev) = run(
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\npartial",
        1000,
    );
    assert_eq!(codes, [220, 250, 250, 250, 354]);
    assert_eq!(ev, ["start MEM1", "reset", "close"]);
    let (_, ev) = run(
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nEHLO c\r\nQUIT\r\n",
        1000,
    );
    assert_eq!(ev, ["reset", "close"]);
    let (_, ev) = run(
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        1000,
    );
    assert_eq!(ev, ["start MEM1", "data", "close"]);
}
