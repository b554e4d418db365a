#!/usr/bin/env python3
"""Helper of tests/milter_real.sh: keys, zone and daemon configs, then the SMTP checks.

  real.py setup DIR DNS_IP DMARC_PORT   keys (RSA via opendkim-genkey, Ed25519 via PyNaCl),
                                        the NSD zone, opendkim/opendmarc/nsd/mailer configs
  real.py run DIR SMTP_PORT             signs fixtures with dkimpy, sends them, checks
                                        replies and stored files; exits 1 on a failure
"""
import base64
import glob
import os
import re
import smtplib
import subprocess
import sys

import dkim
import nacl.signing

DOMAINS = {"none.test": "none", "reject.test": "reject"}


def setup(d, dns_ip, dmarc_port):
    subprocess.run(["opendkim-genkey", "-b", "2048", "-s", "rsa", "-d", "none.test", "-D", d],
                   check=True)
    txt = open(os.path.join(d, "rsa.txt")).read()
    rsa_p = re.search(r"p=([A-Za-z0-9+/=]+)", "".join(re.findall(r'"([^"]*)"', txt))).group(1)
    sk = nacl.signing.SigningKey.generate()
    open(os.path.join(d, "ed.private"), "wb").write(base64.b64encode(bytes(sk)))
    ed_p = base64.b64encode(bytes(sk.verify_key)).decode()

    def txt_record(s):
        # One TXT record made of strings of at most 255 octets (RFC 1035 3.3.14).
        return " ".join('"%s"' % s[i:i + 200] for i in range(0, len(s), 200))

    zone = [
        "$ORIGIN test.", "$TTL 300",
        "@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 300",
        "@ IN NS ns.test.", "ns IN A %s" % dns_ip,
    ]
    for dom, policy in DOMAINS.items():
        label = dom[:-len(".test")]
        zone.append("rsa._domainkey.%s IN TXT %s" % (label, txt_record("v=DKIM1; k=rsa; p=" + rsa_p)))
        zone.append("ed._domainkey.%s IN TXT %s" % (label, txt_record("v=DKIM1; k=ed25519; p=" + ed_p)))
        zone.append('_dmarc.%s IN TXT "v=DMARC1; p=%s"' % (label, policy))
    open(os.path.join(d, "test.zone"), "w").write("\n".join(zone) + "\n")
    open(os.path.join(d, "nsd.conf"), "w").write(f"""server:
    ip-address: {dns_ip}@53
    do-ip6: no
    zonesdir: "{d}"
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    zonelistfile: "{d}/zone.list"
    logfile: "{d}/nsd.log"
    username: ""
    chroot: ""
    database: ""
remote-control:
    control-enable: no
zone:
    name: test
    zonefile: test.zone
""")
    # OpenDKIM resolves through libunbound: forward everything to NSD. Unbound refuses
    # loopback servers unless told otherwise, and answers NXDOMAIN itself for the
    # special-use name "test." (RFC 6761) unless that default is lifted.
    open(os.path.join(d, "unbound.conf"), "w").write(f"""server:
    do-not-query-localhost: no
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-addr: {dns_ip}@53
""")
    # 192.0.2.1 (TEST-NET) stands in for "nobody": by default both treat 127.0.0.1 as
    # internal and would sign or skip instead of verifying.
    open(os.path.join(d, "internal"), "w").write("192.0.2.1\n")
    open(os.path.join(d, "opendkim.conf"), "w").write(f"""Mode v
Socket local:{d}/opendkim.sock
PidFile {d}/opendkim.pid
Syslog no
LogWhy yes
AuthservID mx.test
AlwaysAddARHeader yes
InternalHosts {d}/internal
ResolverConfiguration {d}/unbound.conf
""")
    open(os.path.join(d, "opendmarc.conf"), "w").write(f"""Socket inet:{dmarc_port}@127.0.0.1
PidFile {d}/opendmarc.pid
Syslog false
AuthservID mx.test
TrustedAuthservIDs mx.test
RejectFailures true
IgnoreHosts {d}/internal
IgnoreAuthenticatedClients false
SPFIgnoreResults true
SPFSelfValidate false
FailureReports false
RequiredHeaders false
""")
    open(os.path.join(d, "resolv.conf"), "w").write("nameserver %s\n" % dns_ip)


def message(dom, subject):
    return ("From: Sender <alice@%s>\r\nTo: bob@example.org\r\nSubject: %s\r\n"
            "Date: Mon, 30 Nov 2026 01:00:00 +0000\r\nMessage-ID: <%s@%s>\r\n\r\n"
            "Hello from %s.\r\nSecond line.\r\n" % (dom, subject, subject.replace(" ", "-"), dom, dom)
            ).encode()


def sign(d, msg, dom, kind):
    if kind == "rsa":
        key, alg = open(os.path.join(d, "rsa.private"), "rb").read(), b"rsa-sha256"
    else:
        key, alg = open(os.path.join(d, "ed.private"), "rb").read(), b"ed25519-sha256"
    sig = dkim.sign(msg, kind.encode(), dom.encode(), key, signature_algorithm=alg,
                    canonicalize=(b"relaxed", b"simple"),
                    include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"])
    return sig + msg


FAILED = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILED.append(what)


def stored(d, subject):
    for f in glob.glob(os.path.join(d, "spool", "new", "*")):
        data = open(f, "rb").read()
        if ("Subject: %s\r\n" % subject).encode() in data:
            return data.decode("utf-8", "replace")
    return None


def send(port, msg, sender):
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        try:
            s.sendmail(sender, ["bob@example.org"], msg)
            return "250"
        except smtplib.SMTPDataError as e:
            return "%d %s" % (e.smtp_code, e.smtp_error.decode())


def ar(text):
    """The Authentication-Results fields of a stored message, unfolded."""
    head = text.split("\r\n\r\n", 1)[0]
    return [f for f in re.sub(r"\r\n[ \t]+", " ", head).split("\r\n")
            if f.lower().startswith("authentication-results:")]


def run(d, port):
    port = int(port)
    cases = [
        ("none.test", "rsa", "rsa good", False),
        ("none.test", "ed", "ed25519 good", False),
        ("none.test", "rsa", "rsa changed", True),
        ("reject.test", "rsa", "reject good", False),
        ("reject.test", "rsa", "reject changed", True),
    ]
    for dom, kind, subject, tamper in cases:
        msg = sign(d, message(dom, subject), dom, kind)
        if tamper:
            msg = msg.replace(b"Second line.", b"Second line, changed in transit.")
        reply = send(port, msg, "alice@" + dom)
        text = stored(d, subject)
        results = " | ".join(ar(text)) if text else ""
        print("  %s: %s; %s" % (subject, reply, results))
        if dom == "reject.test" and tamper:
            check(reply.startswith("550 5.7.1"), "%s: 550 5.7.1 from OpenDMARC (got %r)" % (subject, reply))
            check(text is None, "%s: nothing stored" % subject)
            continue
        check(reply == "250", "%s: accepted (got %r)" % (subject, reply))
        if text is None:
            check(False, "%s: stored" % subject)
            continue
        want_dkim = "dkim=fail" if tamper else "dkim=pass"
        check(want_dkim in results, "%s: %s in Authentication-Results" % (subject, want_dkim))
        if not tamper:
            check("dmarc=pass" in results, "%s: dmarc=pass in Authentication-Results" % subject)
            check("header.d=%s" % dom in results or "header.from=%s" % dom in results,
                  "%s: results name %s" % (subject, dom))
    if os.environ.get("RSPAMD_IN_PATH") == "1":
        text = stored(d, "rsa good") or ""
        check("\r\nX-Spamd-Result: " in text, "rsa good: Rspamd's X-Spamd-Result stored")
        gtube = message("none.test", "gtube").replace(
            b"Hello from none.test.", b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X")
        reply = send(port, gtube, "alice@none.test")
        print("  gtube: %s" % reply)
        check(reply.startswith("554 5.7.1"), "gtube: refused by Rspamd (got %r)" % reply)
        check(stored(d, "gtube") is None, "gtube: nothing stored")
    if FAILED:
        print("%d check(s) failed" % len(FAILED))
        sys.exit(1)
    print("all real-milter checks passed")


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(*sys.argv[2:5])
    else:
        run(*sys.argv[2:4])
