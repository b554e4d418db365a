#!/usr/bin/env bash
# Real IMAP (issue 15): mailer delivers into per-mailbox Maildirs and a real Dovecot,
# started in the foreground with a throwaway config, serves them; tests/dovecot.py
# delivers over SMTP and reads back over IMAP (see its docstring for the checks).
#
# Runs as root (as CI does): installs dovecot-imapd when missing. `cargo test` runs it
# through tests/dovecot.rs when Dovecot is installed; by hand: `tests/dovecot.sh`. Dovecot refuses mail
# access as root, so both mailer and Dovecot's mail processes run as `nobody`, the way
# docs/mailboxes.md sets up one service user for both. Every process started here is
# stopped by its own PID.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dovecot >/dev/null 2>&1; then
    echo "dovecot.sh: installing dovecot-imapd"
    if [ -x .ci/install-packages ]; then
        .ci/install-packages # the project's installer: no system service is started
    else
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dovecot-imapd >/dev/null
    fi
fi

# tests/dovecot.rs passes the binary cargo built for the tests; run by hand, build it.
if [ -z "${MAILER_BIN:-}" ]; then
    cargo build --quiet --bin mailer
    MAILER_BIN=target/debug/mailer
fi

RUN_USER=nobody
RUN_GROUP=$(id -gn "$RUN_USER")
WORK=$(mktemp -d /tmp/mailer-dovecot.XXXXXX)
chmod 755 "$WORK"
DOVECOT_PID=""
MAILER_PID=""
cleanup() {
    status=$?
    [ -n "$MAILER_PID" ] && kill -TERM "$MAILER_PID" 2>/dev/null && wait "$MAILER_PID" 2>/dev/null || true
    [ -n "$DOVECOT_PID" ] && kill -TERM "$DOVECOT_PID" 2>/dev/null && wait "$DOVECOT_PID" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        echo "--- mailer log"; cat "$WORK/mailer.log" 2>/dev/null || true
        echo "--- dovecot log"; cat "$WORK/dovecot.log" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Bounded wait for a TCP listener.
wait_port() {
    python3 - "$1" <<'EOF'
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"nothing listens on port {sys.argv[1]} after 20 s")
        time.sleep(0.05)
EOF
}

SMTP_PORT=$(free_port)
IMAP_PORT=$(free_port)
ROOT="$WORK/mail"
mkdir -p "$ROOT" "$WORK/spool"
cp "$MAILER_BIN" "$WORK/mailer"
chown "$RUN_USER:$RUN_GROUP" "$ROOT" "$WORK/spool"

cat >"$WORK/passwd" <<EOF
alice@example.org:{PLAIN}pw-alice
bob@example.org:{PLAIN}pw-bob
EOF

cat >"$WORK/dovecot.conf" <<EOF
protocols = imap
listen = 127.0.0.1
base_dir = $WORK/dovecot-run
state_dir = $WORK/dovecot-state
log_path = $WORK/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:$ROOT/%d/%n
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $WORK/passwd
}
userdb {
  driver = static
  args = uid=$RUN_USER gid=$RUN_GROUP home=$ROOT/%d/%n
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $IMAP_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
EOF

cat >"$WORK/mailer.toml" <<EOF
hostname = "mx.test"
[server]
listen = ["127.0.0.1:$SMTP_PORT"]
workers = 4
stats_interval_secs = 0
[spool]
dir = "$WORK/spool"
file_mode = "0640"
[mailboxes]
root = "$ROOT"
users = ["alice@example.org", "bob@example.org"]
aliases = { "postmaster@example.org" = ["alice@example.org"] }
EOF

# spool.file_mode (SPEC 3) may not be in this build yet: then run without it and skip
# the mode check rather than fail on an unknown key.
CHECK_MODES=1
if ! "$WORK/mailer" check-config --config "$WORK/mailer.toml" >/dev/null 2>"$WORK/check.err"; then
    if grep -q file_mode "$WORK/check.err"; then
        echo "dovecot.sh: this build has no spool.file_mode; running without it"
        sed -i '/^file_mode/d' "$WORK/mailer.toml"
        CHECK_MODES=0
        "$WORK/mailer" check-config --config "$WORK/mailer.toml" >/dev/null
    else
        cat "$WORK/check.err" >&2
        exit 1
    fi
fi

dovecot -F -c "$WORK/dovecot.conf" &
DOVECOT_PID=$!
setpriv --reuid="$RUN_USER" --regid="$RUN_GROUP" --clear-groups \
    "$WORK/mailer" --config "$WORK/mailer.toml" 2>"$WORK/mailer.log" &
MAILER_PID=$!
wait_port "$IMAP_PORT"
wait_port "$SMTP_PORT"

timeout 120 python3 tests/dovecot.py "$SMTP_PORT" "$IMAP_PORT" "$ROOT"

# Modes: stored files as file_mode says, nothing for others (SPEC invariant 9).
bad=""
stored=$(find "$ROOT" -type f -name '*mx.test*' | wc -l)
if [ "$stored" -ne 8 ]; then
    echo "dovecot.sh: FAIL: $stored stored files under $ROOT, expected 8" >&2
    exit 1
fi
if [ "$CHECK_MODES" = 1 ]; then
    bad=$(find "$ROOT" -type f -name '*mx.test*' ! -perm 0640 -print)
    bad="$bad$(find "$ROOT" -mindepth 1 -type d ! -perm 0750 -print)"
fi
if [ -n "$bad" ]; then
    echo "dovecot.sh: FAIL: unexpected modes: $bad" >&2
    exit 1
fi
echo "dovecot.sh: OK"
