#!/usr/bin/env bash
# Debian packages that tests/ops2.rs and tests/metrics.rs need:
#   fail2ban                   fail2ban-regex checks contrib/fail2ban/filter.d/mailer.conf
#   python3-prometheus-client  parses the /metrics output (OpenMetrics parser)
# Run by CI before `cargo test` (as root, or with sudo available).
set -euo pipefail
need=()
command -v fail2ban-regex >/dev/null 2>&1 || need+=(fail2ban)
/usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || need+=(python3-prometheus-client)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
