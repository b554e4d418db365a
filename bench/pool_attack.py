#!/usr/bin/env python3
"""Measures the pool under the attacks of issue 13 against a mailer binary.

    bench/pool_attack.py [PATH/TO/mailer]     (default: target/debug/mailer)

Starts the binary with the shipped pool settings (64 workers, 16 connections per IP)
on a free loopback port and a temporary spool, then:

1. silent: 64 sockets from 127.0.0.2-5 (16 each) connect and say nothing; an honest
   client from 127.0.0.1 tries to deliver one message, retrying on 421 for up to 20 s.
   Prints how long until the message was accepted (or that it never was).
2. refusals: (workers = 2, both inside DATA) 60 clients connect at once; prints the
   slowest time to their 421.
3. unread: 64 connections each pipeline 16384 EHLOs and read nothing; prints the
   server's RSS before and its peak (VmHWM) after.

Needs Linux (127/8 on loopback, /proc). Every wait is bounded.
"""
import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/mailer"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(server_extra):
    d = tempfile.mkdtemp()
    port = free_port()
    cfg = os.path.join(d, "config.toml")
    with open(cfg, "w") as f:
        f.write(
            f'hostname = "mx.test"\n[server]\nlisten = ["127.0.0.1:{port}"]\n'
            f"stats_interval_secs = 0\n{server_extra}\n"
            f'[spool]\ndir = "{d}/spool"\nfsync = false\n'
        )
    p = subprocess.Popen(
        [BIN, "--config", cfg],
        env=dict(os.environ, RUST_LOG="error"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            if s.recv(100).startswith(b"220"):
                s.close()
                return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    sys.exit("server did not start")


def reply(f):
    """One (possibly multi-line) reply from a socket file."""
    text = b""
    while True:
        line = f.readline()
        if not line:
            return text.decode() or "(closed)"
        text += line
        if line[3:4] == b" ":
            return text.decode()


def honest(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    try:
        r = reply(f)
        if not r.startswith("220"):
            return r
        for cmd, want in [
            (b"EHLO honest.test", "250"),
            (b"MAIL FROM:<a@x.test>", "250"),
            (b"RCPT TO:<b@y.test>", "250"),
            (b"DATA", "354"),
            (b"Subject: t\r\n\r\nhello\r\n.", "250"),
        ]:
            s.sendall(cmd + b"\r\n")
            r = reply(f)
            if not r.startswith(want):
                return r
        return "delivered"
    finally:
        s.close()


def silent(port):
    p, port = start("workers = 64\nmax_connections_per_ip = 16")
    try:
        socks = []
        for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]:
            for _ in range(16):
                s = socket.socket()
                s.bind((src, 0))
                s.settimeout(10)
                s.connect(("127.0.0.1", port))
                s.recv(100)
                socks.append(s)
        began = time.time()
        tries, last = 0, ""
        while time.time() - began < 20:
            tries += 1
            last = honest(port)
            if last == "delivered":
                print(
                    f"silent: 64 silent sockets; honest client delivered after "
                    f"{time.time() - began:.3f} s ({tries} attempt(s))"
                )
                return
            time.sleep(0.2)
        print(f"silent: 64 silent sockets; NO delivery within 20 s ({tries} attempts, last: {last.strip()})")
    finally:
        p.kill()
        p.wait()


def refusals():
    p, port = start("workers = 2\nmax_connections_per_ip = 100")
    try:
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            f = s.makefile("rb")
            reply(f)
            for cmd in [b"EHLO c.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"DATA"]:
                s.sendall(cmd + b"\r\n")
                reply(f)
            held.append(s)
        times = []
        lock = threading.Lock()
        barrier = threading.Barrier(60)

        def one():
            barrier.wait()
            t0 = time.time()
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            got = s.recv(200)
            with lock:
                times.append((time.time() - t0, got[:9]))
            s.close()

        ts = [threading.Thread(target=one) for _ in range(60)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        slowest = max(t for t, _ in times)
        codes = sorted(set(g for _, g in times))
        print(f"refusals: 60 clients while all workers are in DATA; slowest 421 after {slowest:.3f} s; replies {codes}")
    finally:
        p.kill()
        p.wait()


def kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def unread():
    p, port = start("workers = 64\nmax_connections_per_ip = 64")
    try:
        conns = []
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.recv(100)
            conns.append(s)
        before = kib(p.pid, "VmRSS:")
        data = b"EHLO c.test\r\n" * 16384

        def flood(s):
            s.settimeout(3)
            try:
                s.sendall(data)
            except OSError:
                pass

        ts = [threading.Thread(target=flood, args=(s,)) for s in conns]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        # Let the server work through what the kernel buffered, bounded.
        last, deadline = -1, time.time() + 20
        while time.time() < deadline:
            now = kib(p.pid, "VmHWM:")
            if now == last:
                break
            last = now
            time.sleep(1)
        print(f"unread: 64 connections pipelining EHLO without reading; RSS {before} KiB before, peak {kib(p.pid, 'VmHWM:')} KiB after")
    finally:
        p.kill()
        p.wait()


if __name__ == "__main__":
    print(f"binary: {BIN}")
    silent(None)
    refusals()
    unread()
