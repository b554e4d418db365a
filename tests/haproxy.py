#!/usr/bin/env python3
"""Scale-out test (issue 8), run by tests/haproxy.sh: two mailer instances with separate
spools and `proxy_protocol = true` behind one HAProxy frontend using send-proxy-v2.

Phase 1: a batch of messages from a client bound to 127.0.0.2 (HAProxy itself connects
to the backends from 127.0.0.1). Every message is stored exactly once across the two
spools, both instances got a share, and each Received header names 127.0.0.2: the
client address came from the PROXY header, not from the proxy's socket.

Phase 2: a second batch; after some of it is acknowledged, one instance gets SIGTERM.
Clients retry what was not acknowledged (as an MTA would), HAProxy routes the rest to
the survivor, and every message that got a 250 is in a spool under the queue id of its
reply, exactly once. Every wait is bounded; only the processes started here are
stopped, by PID.
"""

import ctypes
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

CLIENT_SOURCE = "127.0.0.2"
PHASE1 = 40
PHASE2 = 80
STOP_AFTER = 20  # phase-2 acknowledgements before the SIGTERM
CONCURRENCY = 4
ATTEMPTS = 20


def die_with_parent():
    """Children get SIGKILL if this script dies without cleaning up (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()
        return self.p.returncode


def mailer_config(tmp, name, port):
    spool = os.path.join(tmp, name, "spool")
    path = os.path.join(tmp, name, "config.toml")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(f"""hostname = "{name}.test"
[server]
listen = ["127.0.0.1:{port}"]
workers = 8
max_connections_per_ip = 16
proxy_protocol = true
shutdown_grace_secs = 5
stats_interval_secs = 1
[limits]
command_timeout_secs = 10
[spool]
dir = "{spool}"
fsync = true
""")
    return path, spool


HAPROXY_CFG = """global
    maxconn 256
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1s
    timeout client 20s
    timeout server 20s
    # A refused connect is retried on the other instance (redispatch on every retry).
    retries 2
    option redispatch 1

frontend smtp
    bind 127.0.0.1:{front}
    default_backend mailers

backend mailers
    balance roundrobin
    # SMTP health check (greeting, EHLO, QUIT); it carries a PROXY v2 LOCAL header.
    option smtpchk EHLO haproxy.test
    server mx-a 127.0.0.1:{a} send-proxy-v2 check inter 300ms fall 2 rise 2
    server mx-b 127.0.0.1:{b} send-proxy-v2 check inter 300ms fall 2 rise 2
"""


def smtp_ready(port, header=b"PROXY UNKNOWN\r\n"):
    """A greeting on a direct connection (with a PROXY header) or through HAProxy."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            if header:
                s.sendall(header)
            data = s.recv(512)
            s.sendall(b"QUIT\r\n")
            return data.startswith(b"220 ")
    except OSError:
        return False


def send_one(front, tag):
    """One message from 127.0.0.2 through HAProxy; returns the 250 reply text."""
    with smtplib.SMTP("127.0.0.1", front, timeout=10, source_address=(CLIENT_SOURCE, 0)) as s:
        s.ehlo("client.test")
        code, resp = s.mail("sender@client.test")
        if code != 250:
            raise smtplib.SMTPResponseException(code, resp)
        code, resp = s.rcpt("rcpt@example.org")
        if code != 250:
            raise smtplib.SMTPResponseException(code, resp)
        msg = f"Subject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n\r\nbody of {tag}\r\n"
        code, resp = s.data(msg.encode())
        if code != 250:
            raise smtplib.SMTPResponseException(code, resp)
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass  # the message is acknowledged; a lost QUIT does not matter
        return resp.decode()


def deliver(front, tag, on_ack=None):
    """Retries until acknowledged, as a sending MTA would. Returns (queue id, attempts)."""
    last = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            reply = send_one(front, tag)
            m = re.match(r"2\.0\.0 Ok: queued as (\S+)$", reply)
            assert m, f"unexpected 250 text {reply!r}"
            if on_ack:
                on_ack(tag, m.group(1))
            return m.group(1), attempt
        except (smtplib.SMTPException, OSError) as e:
            last = e
            time.sleep(0.1)
    raise AssertionError(f"{tag}: not delivered after {ATTEMPTS} attempts: {last!r}")


class InFlight:
    """A session straight to one instance (with its own PROXY header) that is inside
    DATA when that instance gets SIGTERM: the message must finish and be stored."""

    def __init__(self, port, tag):
        self.tag = tag
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.s.makefile("rb")
        self.s.sendall(f"PROXY TCP4 {CLIENT_SOURCE} 127.0.0.1 40000 25\r\n".encode())
        self.expect(b"220")
        for cmd, code in [(b"HELO client.test", b"250"), (b"MAIL FROM:<sender@client.test>", b"250"),
                          (b"RCPT TO:<rcpt@example.org>", b"250"), (b"DATA", b"354")]:
            self.s.sendall(cmd + b"\r\n")
            self.expect(code)
        self.s.sendall(f"Subject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n".encode())

    def expect(self, code):
        line = self.f.readline()
        assert line.startswith(code + b" "), f"{self.tag}: expected {code!r}, got {line!r}"
        return line.decode().strip()

    def finish(self):
        """Sends the rest of the message; returns the queue id of the 250."""
        self.s.sendall(f"\r\nbody of {self.tag}\r\n.\r\n".encode())
        line = self.expect(b"250")
        qid = line.rsplit(" ", 1)[1]
        # The session is over now: the next command gets 421 4.3.2 (shutting down).
        self.s.sendall(b"NOOP\r\n")
        self.expect(b"421")
        self.s.close()
        return qid


def refuses(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def read_spool(spool):
    """{file name: bytes} of new/."""
    d = os.path.join(spool, "new")
    out = {}
    for n in os.listdir(d):
        with open(os.path.join(d, n), "rb") as f:
            out[n] = f.read()
    return out


def check_spools(spools, acked):
    """Every acknowledged (tag -> queue id) is stored once, under that queue id, with
    the client's own address in Received. Returns {instance: count}."""
    where = {}
    per_instance = {}
    for name, spool in spools.items():
        files = read_spool(spool)
        per_instance[name] = len(files)
        for fname, data in files.items():
            m = re.search(rb"^Subject: (\S+)\r$", data, re.M)
            assert m, f"{name}/{fname}: no Subject"
            tag = m.group(1).decode()
            assert tag not in where, f"{tag} stored twice: {where[tag]} and {name}/{fname}"
            where[tag] = (name, fname, data)
    assert set(where) == set(acked), (
        f"stored but not acknowledged: {sorted(set(where) - set(acked))}; "
        f"acknowledged but lost: {sorted(set(acked) - set(where))}"
    )
    for tag, qid in acked.items():
        name, fname, data = where[tag]
        assert f".{qid}." in fname, f"{tag}: acknowledged as {qid}, stored as {name}/{fname}"
        received = re.search(rb"^Received: from client\.test \(\[([^\]]+)\]\)", data, re.M)
        assert received, f"{tag}: no Received header:\n{data[:400]!r}"
        assert received.group(1).decode() == CLIENT_SOURCE, (
            f"{tag}: Received names {received.group(1).decode()}, not the client {CLIENT_SOURCE}"
        )
        assert f"\r\nbody of {tag}\r\n".encode() in data
    return per_instance


def main():
    binary = os.path.abspath(sys.argv[1])
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="mailer-haproxy-")
    procs = []

    def on_term(signum, frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    ok = False
    try:
        ports = {"a": free_port(), "b": free_port(), "front": free_port()}
        spools, mailers = {}, {}
        for name in ("a", "b"):
            cfg, spool = mailer_config(tmp, f"mx-{name}", ports[name])
            spools[name] = spool
            mailers[name] = Proc(f"mx-{name}", [binary, "--config", cfg],
                                 os.path.join(tmp, f"mx-{name}.log"))
            procs.append(mailers[name])
        for name in ("a", "b"):
            wait_for(f"mx-{name} on port {ports[name]}", lambda n=name: smtp_ready(ports[n]))
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(**ports))
        check = subprocess.run(["haproxy", "-c", "-f", cfg], capture_output=True, timeout=10)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy = Proc("haproxy", ["haproxy", "-db", "-f", cfg], os.path.join(tmp, "haproxy.log"))
        procs.append(haproxy)
        wait_for("HAProxy frontend", lambda: smtp_ready(ports["front"], header=None))
        pids = {name: m.p.pid for name, m in mailers.items()}
        print(f"mx-a pid {pids['a']} port {ports['a']}, mx-b pid {pids['b']} port {ports['b']}, "
              f"haproxy pid {haproxy.p.pid} port {ports['front']}")

        # Phase 1: a batch through the balancer.
        t0 = time.monotonic()
        acked = {}
        lock = threading.Lock()

        def record(tag, qid):
            with lock:
                acked[tag] = qid

        tags = [f"p1-{i:03d}" for i in range(PHASE1)]
        with ThreadPoolExecutor(CONCURRENCY) as ex:
            results = list(ex.map(lambda t: deliver(ports["front"], t, record), tags))
        retries = sum(a - 1 for _, a in results)
        counts = check_spools(spools, acked)
        assert counts["a"] > 0 and counts["b"] > 0, f"one instance got nothing: {counts}"
        assert retries == 0, f"{retries} retries with both instances up"
        print(f"phase 1: {PHASE1} messages in {time.monotonic() - t0:.2f}s, "
              f"stored once each: mx-a {counts['a']}, mx-b {counts['b']}; "
              f"Received says {CLIENT_SOURCE} (HAProxy connects from 127.0.0.1)")

        # Phase 2: SIGTERM to mx-a in the middle of a batch.
        t0 = time.monotonic()
        stop_sent = threading.Event()
        stopped_at = {}
        after_exit = []

        def record2(tag, qid):
            with lock:
                acked[tag] = qid
                n2 = sum(1 for t in acked if t.startswith("p2-"))
                if "exited" in stopped_at:
                    after_exit.append(qid)
                if n2 >= STOP_AFTER and not stop_sent.is_set():
                    stop_sent.set()
                    stopped_at["t"] = time.monotonic()
                    mailers["a"].p.send_signal(signal.SIGTERM)

        def watch_exit():
            # Note when mx-a has exited: from then on everything must go to mx-b.
            mailers["a"].p.wait(30)
            with lock:
                stopped_at["exited"] = time.monotonic()

        watcher = threading.Thread(target=watch_exit, daemon=True)
        watcher.start()
        inflight = InFlight(ports["a"], "p2-inflight")

        def finish_inflight():
            stop_sent.wait(30)
            # mx-a is stopping once its listener is gone; the message in DATA goes on.
            wait_for("mx-a listener closed", lambda: refuses(ports["a"]))
            record("p2-inflight", inflight.finish())

        finisher = threading.Thread(target=finish_inflight, daemon=True)
        finisher.start()
        tags = [f"p2-{i:03d}" for i in range(PHASE2)]
        with ThreadPoolExecutor(CONCURRENCY) as ex:
            results = list(ex.map(lambda t: deliver(ports["front"], t, record2), tags))
        assert stop_sent.is_set(), "SIGTERM never sent"
        finisher.join(15)
        assert "p2-inflight" in acked, "the message in DATA at the SIGTERM was not acknowledged"
        rc = mailers["a"].p.wait(15)
        watcher.join(5)
        assert rc == 0, f"mx-a exited {rc} after SIGTERM"
        retries = sum(a - 1 for _, a in results)
        counts = check_spools(spools, acked)
        pid_of = lambda qid: int(re.search(r"P(\d+)[RQ]", qid).group(1))
        assert all(pid_of(q) == pids["b"] for q in after_exit), "acknowledged by mx-a after it exited?"
        by_a = sum(1 for t, q in acked.items()
                   if t.startswith("p2-") and t != "p2-inflight" and pid_of(q) == pids["a"])
        assert pid_of(acked["p2-inflight"]) == pids["a"]
        by_b = sum(1 for t, q in acked.items() if t.startswith("p2-") and pid_of(q) == pids["b"])
        grace = stopped_at["exited"] - stopped_at["t"]
        print(f"phase 2: {PHASE2} messages in {time.monotonic() - t0:.2f}s; SIGTERM to mx-a after "
              f"{STOP_AFTER} acks, mx-a finished the message it was receiving and exited 0 after "
              f"{grace:.2f}s; mx-a acknowledged {by_a} (+1 direct), "
              f"mx-b {by_b} ({len(after_exit)} after mx-a had exited); {retries} client retries; "
              f"every acknowledged queue id found in a spool exactly once "
              f"(totals: mx-a {counts['a']}, mx-b {counts['b']})")
        stats = [l for l in mailers["b"].text().splitlines() if " stats: " in l]
        if stats:
            print("mx-b " + stats[-1].split(" stats: ", 1)[1].join(["stats: ", ""]))
        ok = True
    finally:
        for p in reversed(procs):
            p.stop()
        if not ok:
            for p in procs:
                print(f"---- {p.name} log (tail)")
                print("\n".join(p.text().splitlines()[-40:]))
            print(f"(logs and spools kept in {tmp})")
        else:
            subprocess.run(["rm", "-rf", tmp], check=False)
    print(f"haproxy scale-out test: OK in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
