#!/usr/bin/env python3
"""Writes the seed corpus: fuzz/corpus/<target>/seed-<name>.

Run from anywhere: python3 fuzz/seeds.py. The seeds are committed; this script says what
each one is and regenerates them. Files that libFuzzer adds to a corpus directory (named
by their SHA-1) are not committed (see .gitignore).
"""
import base64
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def b64(s):
    return base64.b64encode(s).decode()


# --- session: 4 header bytes (see Knobs::from_header), then the client's bytes ------
# h0: bits 0-1 max_message_size [64, 300, 1000, 100000]; bits 2-4 max_recipients-1;
#     bit 5 AUTH off; bit 6 fake TLS fails.  h1: bits 0-3 max_errors-1; bits 4-5
#     max_line_length [512, 600, 1000, 4096]; bit 6 bare_lf = reject; bit 7 no TLS.
# h2: read-size seed.  h3 & 7: largest read [1, 2, 7, 64, 512, 4096, 100000, 1 MiB].
def hdr(size=3, rcpts=8, auth=True, tls_ok=True, errors=16, line=2, reject=False,
        tls=True, seed=7, piece=7):
    h0 = size | (rcpts - 1) << 2 | (0 if auth else 0x20) | (0 if tls_ok else 0x40)
    h1 = (errors - 1) | line << 4 | (0x40 if reject else 0) | (0 if tls else 0x80)
    return bytes([h0, h1, seed, piece])


EHLO = b"EHLO client.test\r\n"
ENV = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nforged\r\n"

session = {
    "one-message": EHLO + ENV + b"DATA\r\nSubject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    "pipelined-two": EHLO + ENV + b"DATA\r\n..dot\r\n.\r\n" + ENV
    + b"RCPT TO:<c@y.test>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n",
    "helo-rset-noop-vrfy-help": b"HELO c\r\nNOOP x\r\nVRFY bob\r\nEXPN list\r\nHELP\r\n"
    + b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nRSET\r\nQUIT\r\n",
    "errors-until-421": EHLO + b"FOO\r\nRCPT TO:<b@y.test>\r\nDATA\r\nMAIL FROM:<bad\r\n" * 6,
    "long-line": EHLO + b"NOOP " + b"x" * 5000 + b"\r\n" + ENV + b"DATA\r\nx\r\n.\r\n",
    "too-many-rcpts": EHLO + b"MAIL FROM:<a@x.test>\r\n"
    + b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(12)) + b"DATA\r\nx\r\n.\r\n",
    "size-param-and-oversize": EHLO + b"MAIL FROM:<a@x.test> SIZE=999999999\r\n" + ENV
    + b"DATA\r\n" + b"0123456789" * 40 + b"\r\n.\r\nNOOP\r\n",
    "params-utf8": EHLO + "MAIL FROM:<jösé@x.test> SMTPUTF8 BODY=8BITMIME\r\n".encode()
    + "RCPT TO:<例え@y.test>\r\nDATA\r\nü\r\n.\r\n".encode(),
    # SMTP smuggling (CVE-2023-51764): none of these shapes may end the message.
    "smuggle-lf-dot-lf": EHLO + ENV + b"DATA\r\nbody\n.\n" + SMUGGLED + b".\r\n",
    "smuggle-lf-dot-crlf": EHLO + ENV + b"DATA\r\nbody\n.\r\n" + SMUGGLED + b".\r\n",
    "smuggle-crlf-dot-lf": EHLO + ENV + b"DATA\r\nbody\r\n.\n" + SMUGGLED + b".\r\n",
    "smuggle-cr-dot-cr": EHLO + ENV + b"DATA\r\nbody\r.\r" + SMUGGLED + b".\r\n",
    "smuggle-cr-dot-crlf": EHLO + ENV + b"DATA\r\nbody\r.\r\n" + SMUGGLED + b".\r\n",
    "bare-lf-reject": EHLO + ENV + b"DATA\r\na\nb\r\n.\r\n" + ENV + b"DATA\r\nok\r\n.\r\n",
    # STARTTLS command injection (CVE-2011-0411): pipelined bytes after STARTTLS.
    "starttls-injection": EHLO + b"STARTTLS\r\n" + ENV + b"DATA\r\ninjected\r\n.\r\n",
    "starttls-injection-lf": EHLO + b"STARTTLS\nRSET\n",
    "starttls-clean": EHLO + b"STARTTLS\r\n",
    "starttls-then-session": EHLO + b"STARTTLS\r\n" + ENV + EHLO + b"STARTTLS\r\n" + ENV
    + b"DATA\r\nsecure\r\n.\r\nQUIT\r\n",
    "bdat-binary": EHLO + ENV + b"BDAT 12\r\n\x00\xff\r\n.\r\nQUIT\r\nx" + b"BDAT 4 LAST\r\n\r\n.\r\n"
    + b"NOOP\r\n",
    "bdat-errors": EHLO + b"BDAT 3\r\nabc" * 20,
    "bdat-oversize": EHLO + ENV + b"BDAT 200\r\n" + b"y" * 200 + b"BDAT 1 LAST\r\nz"
    + b"DATA\r\n",
    "bdat-then-data": EHLO + ENV + b"BDAT 2\r\nab" + b"DATA\r\nRSET\r\n" + ENV
    + b"BDAT 0 LAST\r\n",
    "auth-plain": EHLO + b"AUTH PLAIN " + b64(b"\0alice\0secret").encode() + b"\r\n"
    + ENV + b"DATA\r\nx\r\n.\r\n",
    "auth-login": EHLO + b"AUTH LOGIN\r\n" + b64(b"alice").encode() + b"\r\n"
    + b64(b"wrong").encode() + b"\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\nQUIT\r\n",
    "eof-in-data": EHLO + ENV + b"DATA\r\nunfinished",
}
for name, body in session.items():
    h = hdr()
    if name == "errors-until-421":
        h = hdr(errors=3)
    elif name == "bdat-errors":
        h = hdr(errors=4)
    elif name == "bare-lf-reject":
        h = hdr(reject=True)
    elif name.startswith("starttls-injection"):
        h = hdr(piece=7)
    elif name == "starttls-clean":
        h = hdr(tls_ok=False)
    elif name in ("size-param-and-oversize", "bdat-oversize"):
        h = hdr(size=1)
    elif name == "too-many-rcpts":
        h = hdr(rcpts=4)
    elif name == "long-line":
        h = hdr(line=0, piece=4)
    elif name.startswith("smuggle"):
        h = hdr(piece=2)
    write("session", name, h + body)



# Found by the bdat target once content guards came in: a first chunk starting with a
# tab is stored after an empty line (invariant 11).
write("bdat", "leading-tab", base64.b64decode("MTIzAgAAADg5AQl4eHh4eAoAAAB4eAIAAAB4eAUBIQ=="))

# The client halves of the SMTP dialogue scripts in tests/dialogs/ (the reply contract
# as conversations) are session seeds too: every line a script sends, in order.
def unescape(text):
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        n = text[i + 1]
        if n == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
            continue
        out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[n]
        i += 2
    return bytes(out)


DIALOGS = os.path.join(HERE, "..", "tests", "dialogs")
for script in sorted(os.listdir(DIALOGS)):
    if not script.endswith(".smtp"):
        continue
    sent = b""
    for line in open(os.path.join(DIALOGS, script), encoding="utf-8"):
        line = line.rstrip("\n")
        if line.startswith("C: "):
            sent += line[3:].encode() + b"\r\n"
        elif line.startswith("C> "):
            sent += unescape(line[3:])
    write("session", "dialog-" + script[:-len(".smtp")], hdr() + sent)

# --- command: one command line, without CRLF ----------------------------------------
commands = [
    b"EHLO client.test", b"helo c", b"MAIL FROM:<a@x.test> SIZE=1000 BODY=8BITMIME",
    b"MAIL FROM:<> AUTH=<>", "MAIL FROM:<jösé@例え.test> SMTPUTF8".encode(),
    b"mail from: a@x.test", b"RCPT TO:<@r1.test,@r2.test:b@y.test>",
    b"RCPT TO:<\"quoted \\\" local\"@[192.0.2.1]>", b"RCPT TO:<b@[IPv6:2001:db8::1]>",
    b"RCPT TO:<Postmaster>", b"RCPT TO:<b@y.test> NOTIFY=NEVER", b"DATA", b"BDAT 10 LAST",
    b"bdat 0", b"RSET", b"NOOP anything", b"QUIT", b"VRFY bob", b"EXPN x", b"HELP",
    b"STARTTLS", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH LOGIN", b"NOOP \x01",
    b"\xff\xfe", b"MAIL FROM:<a@x.test> BODY=BINARYMIME", b"MAIL FROM:<a@[tag:x]>",
]
for i, c in enumerate(commands):
    write("command", "%02d" % i, c)

# --- data: options byte, split byte, then the bytes after DATA ----------------------
# options: bits 0-1 max size [0, 8, 64, 1 GiB]; bit 2 bare_lf = reject.
shapes = {
    "simple": b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n",
    "empty": b".\r\n",
    "stuffed": b"..a\r\n...\r\n.\r\n",
    "lf-dot-lf": b"a\n.\nb\r\n.\r\n",
    "lf-dot-crlf": b"a\n.\r\nb\r\n.\r\n",
    "crlf-dot-lf": b"a\r\n.\nb\r\n.\r\n",
    "cr-dot-cr": b"a\r.\rb\r\n.\r\n",
    "cr-dot-crlf": b"a\r.\r\nb\r\n.\r\n",
    "dot-cr-cr-lf": b".\r\r\n.\r\n",
    "bare-cr": b"a\rb\r\r\n.\r\n",
    "no-end": b"line\r\n.x\r\n",
    "binary": bytes(range(256)) + b"\r\n.\r\n",
}
for name, body in shapes.items():
    write("data", name, bytes([3, 128]) + body)
    write("data", name + "-reject-small", bytes([6, 40]) + body)

# --- bdat: max-size selector, read seed, read-size selector, then operations --------
# op & 3: 0 MAIL+RCPT; 1 BDAT <next byte> octets; 2 BDAT <next byte * 9> octets;
# 3 NOOP (op & 4: RSET). For BDAT: op & 4 LAST, op & 8 lower-case verb.
def bdat(n, payload, last=False):
    return bytes([1 | (4 if last else 0), n]) + payload


write("bdat", "one-chunk", bytes([3, 1, 7, 0]) + bdat(5, b"hello", last=True))
write("bdat", "binary-chunks", bytes([3, 2, 3, 0]) + bdat(8, b"\x00\r\n.\r\n\xff\n")
      + bdat(6, b"QUIT\r\n") + bytes([3 | 4]) + bytes([0]) + bdat(3, b"end", last=True))
write("bdat", "oversize", bytes([0, 3, 2, 0]) + bdat(10, b"0123456789") + bdat(9, b"x" * 9)
      + bdat(1, b"!", last=True))
write("bdat", "no-transaction", bytes([2, 5, 1]) + bdat(4, b"RSET") + bytes([0])
      + bytes([2 | 4 | 8, 3]) + b"z" * 27)

# --- auth: selector (bits 0-1 PLAIN/LOGIN/CRAM-MD5/plain; bit 2 initial response), lines
write("auth", "plain-initial", bytes([4]) + b64(b"\0alice\0secret").encode())
write("auth", "plain-authz", bytes([4]) + b64(b"bob\0alice\0secret").encode())
write("auth", "plain-challenge", bytes([0]) + b"\n" + b64(b"alice\0alice\0secret").encode())
write("auth", "login", bytes([1]) + b64(b"alice").encode() + b"\r\n" + b64(b"secret").encode())
write("auth", "cancel", bytes([1]) + b"*\n")
write("auth", "empty-and-junk", bytes([4]) + b"=\n!!!\nQUIT")

# --- address: a mailbox, a path, or a domain -----------------------------------------
addresses = [
    "a@x.test", "\"a b\"@x.test", "\"a\\\"b\"@x.test", "Postmaster", "a@[192.0.2.1]",
    "a@[IPv6:2001:db8::1]", "a@[tag:content]", "jösé@例え.テスト", "<@r1.test,@r2.test:a@x.test>",
    "<a@x.test> SIZE=1", " <> ", "x-y.z", "a.b.c@d-e.f", "<\"a>b\"@x.test>",
]
for i, a in enumerate(addresses):
    write("address", "%02d" % i, a.encode())

# --- proxy: selector byte (bit 0: v6 for the round trip), then a PROXY header ----------
V2SIG = b"\r\n\r\n\x00\r\nQUIT\n"
proxy = {
    "v1-tcp4": b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\nEHLO c\r\n",
    "v1-tcp6": b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n",
    "v1-unknown": b"PROXY UNKNOWN ffff::1 ::2 1 2\r\n",
    "v1-bad-port": b"PROXY TCP4 192.0.2.1 198.51.100.1 056324 25\r\n",
    "v1-partial": b"PROXY TCP4 192.0",
    "v2-inet": V2SIG + bytes([0x21, 0x11, 0, 12]) + bytes([192, 0, 2, 1, 198, 51, 100, 1])
    + (4000).to_bytes(2, "big") + (25).to_bytes(2, "big") + b"EHLO c\r\n",
    "v2-inet6-tlv": V2SIG + bytes([0x21, 0x21, 0, 36 + 7]) + bytes(range(32))
    + b"\x0f\xa0\x00\x19" + b"\x04\x00\x04abcd",
    "v2-local": V2SIG + bytes([0x20, 0x00, 0, 0]),
    "v2-unix": V2SIG + bytes([0x21, 0x31, 0, 216]) + b"/tmp/a".ljust(216, b"\0"),
    "smtp-instead": b"EHLO client.test\r\n",
}
for name, body in proxy.items():
    write("proxy", name, bytes([0]) + body)
    write("proxy", name + "-6", bytes([1]) + body)

# --- reply: split byte, then server output ------------------------------------------
replies = {
    "greeting": b"220 mx.test ESMTP\r\n",
    "ehlo": b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 HELP\r\n",
    "pipelined": b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n354 go\r\n",
    "bare-lf": b"550-a\n550 b\n",
    "mismatch": b"250-a\r\n251 b\r\n",
    "code-only": b"250\r\n",
    "incomplete": b"250-a\r\n250 b",
    "bad": b"hello\r\n",
}
for name, body in replies.items():
    write("reply", name, bytes([0x80]) + body)

# --- milter: what a filter sends back (4-byte length, reply byte, payload) -----------
def mpkt(code, payload=b""):
    return (len(payload) + 1).to_bytes(4, "big") + code + payload


milter = {
    "continue": mpkt(b"c"),
    "optneg": mpkt(b"O", bytes([0, 0, 0, 6, 0, 0, 0, 0x31, 0, 0, 0, 0x7f])
                   + bytes([0, 0, 0, 5]) + b"i {auth_type}\0"),
    "eob-edits": mpkt(b"h", b"Authentication-Results\0mx.test;\n\tdkim=pass\0")
    + mpkt(b"i", bytes([0, 0, 0, 1]) + b"X-I\0v\0")
    + mpkt(b"m", bytes([0, 0, 0, 1]) + b"Subject\0\0")
    + mpkt(b"q", b"virus\0") + mpkt(b"p") + mpkt(b"a"),
    "replycode": mpkt(b"y", b"550-5.7.1 one\r\n550 5.7.1 two\0"),
    "replycode-bad": mpkt(b"y", b"250 ok\0"),
    "oversize": bytes([0, 0x20, 0, 1]) + b"c",
    "truncated": mpkt(b"h", b"X\0v\0")[:-2],
}
for name, body in milter.items():
    write("milter", name, body)
