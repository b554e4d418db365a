#!/usr/bin/env python3
"""Driven by tests/dovecot.sh: delivers through mailer (SMTP) and reads the mail back
through Dovecot (IMAP), both already running on loopback ports.

Checks (issue 15): bodies byte-exact over IMAP; each mailbox's copy names only its own
recipients (SPEC invariant 9); an alias plus a direct recipient give one copy; a flag
set over IMAP persists (Dovecot moves the file to cur/ with the flag in its name); and
mailer keeps delivering into a Maildir that Dovecot has open.

usage: dovecot.py SMTP_PORT IMAP_PORT MAIL_ROOT
"""
import imaplib
import os
import smtplib
import sys
import time

SMTP_PORT, IMAP_PORT, ROOT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
PASSWORDS = {"alice@example.org": "pw-alice", "bob@example.org": "pw-bob"}
DEADLINE = 20.0  # seconds any single wait may take


def fail(msg):
    print(f"dovecot.py: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def message(subject, extra=b""):
    # 8-bit text, a line starting with a dot (stuffed on the wire, not on disk) and a
    # line that is only spaces: each would show if anything re-encoded the content.
    return (
        b"From: Sender <sender@remote.test>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Gr\xc3\xbc\xc3\x9fe aus dem Test.\r\n"
        b".a line that starts with a dot\r\n"
        b"   \r\n" + extra + b"end\r\n"
    )


def send(rcpts, body):
    with smtplib.SMTP("127.0.0.1", SMTP_PORT, timeout=DEADLINE) as s:
        s.ehlo("client.test")
        refused = s.sendmail("sender@remote.test", rcpts, body)
        check(refused == {}, f"refused recipients: {refused}")


def maildir_files(user, sub):
    local, domain = user.split("@")
    d = os.path.join(ROOT, domain, local, sub)
    try:
        return sorted(os.path.join(d, f) for f in os.listdir(d))
    except FileNotFoundError:
        return []


def trace_and_content(stored):
    """Splits a stored copy into its trace lines and the message as received."""
    lines, pos = [], 0
    while True:
        end = stored.index(b"\r\n", pos) + 2
        line = stored[pos:end]
        if line.startswith((b"Delivered-To: ", b"Return-Path: ", b"X-Original-To: ",
                            b"Received: ")) or (lines and line.startswith((b" ", b"\t"))):
            lines.append(line)
            pos = end
        else:
            return lines, stored[pos:]


def imap(user):
    c = imaplib.IMAP4("127.0.0.1", IMAP_PORT, timeout=DEADLINE)
    c.login(user, PASSWORDS[user])
    return c


def fetch_all(c):
    typ, data = c.select("INBOX")
    check(typ == "OK", f"SELECT: {typ} {data}")
    n = int(data[0])
    out = []
    for i in range(1, n + 1):
        typ, d = c.fetch(str(i), "(BODY.PEEK[])")
        check(typ == "OK", f"FETCH {i}: {typ}")
        out.append(d[0][1])
    return out


# 1. One message to two mailboxes and, through an alias, once more to alice.
first = message("to alice and bob")
send(["alice@example.org", "bob@example.org", "postmaster@example.org"], first)
second = message("to alice+tag only", b"second\r\n")
send(["Alice+tag@Example.org"], second)

on_disk = {u: [open(f, "rb").read() for f in maildir_files(u, "new")] for u in PASSWORDS}
check(len(on_disk["alice@example.org"]) == 2, f"alice: {len(on_disk['alice@example.org'])} files")
check(len(on_disk["bob@example.org"]) == 1, f"bob: {len(on_disk['bob@example.org'])} files")

for user, copies in on_disk.items():
    for stored in copies:
        trace, content = trace_and_content(stored)
        check(trace[0] == f"Delivered-To: {user}\r\n".encode(), f"{user}: {trace[0]!r}")
        originals = [l for l in trace if l.startswith(b"X-Original-To: ")]
        # Invariant 9: only the recipients that led to this mailbox.
        for l in originals:
            check(b"bob" not in l if user.startswith("alice") else b"bob@" in l,
                  f"{user}: foreign recipient {l!r}")
        check(content in (first, second), f"{user}: content differs: {content!r}")

# 2. IMAP returns the stored bytes exactly.
for user, copies in on_disk.items():
    c = imap(user)
    got = fetch_all(c)
    check(sorted(got) == sorted(copies), f"{user}: IMAP bodies differ from the files")
    c.logout()

# 3. A flag set over IMAP persists: Dovecot moves the file to cur/ and names the flag.
c = imap("alice@example.org")
c.select("INBOX")
typ, _ = c.store("1", "+FLAGS", "(\\Flagged \\Seen)")
check(typ == "OK", "STORE")
c.logout()
flagged = [f for f in maildir_files("alice@example.org", "cur") if f.endswith(":2,FS")]
check(len(flagged) == 1, f"cur/: {maildir_files('alice@example.org', 'cur')}")
c = imap("alice@example.org")
c.select("INBOX")
typ, d = c.fetch("1", "(FLAGS)")
check(b"\\Flagged" in d[0] and b"\\Seen" in d[0], f"flags after re-login: {d}")

# 4. mailer keeps delivering while Dovecot holds the Maildir open (this session stays
#    selected): new mail shows up on NOOP, byte-exact.
more = [message(f"while open {i}", f"n={i}\r\n".encode()) for i in range(5)]
for m in more:
    send(["alice@example.org"], m)
deadline = time.monotonic() + DEADLINE
while True:
    typ, d = c.noop()
    typ, d = c.select("INBOX", readonly=True)
    if int(d[0]) == 7:
        break
    check(time.monotonic() < deadline, f"EXISTS stays at {d[0]}")
    time.sleep(0.1)
bodies = fetch_all(c)
contents = [trace_and_content(b)[1] for b in bodies]
check(sorted(contents[2:]) == sorted(more), "messages delivered while open differ")
c.logout()
print("dovecot.py: OK: 8 copies read back over IMAP, flags persisted")
