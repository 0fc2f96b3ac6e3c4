#!/usr/bin/env bash
# Check deploy/prometheus/ with promtool: the scrape config, the alert rules, and the rules' unit tests
# (alerts_test.yml). promtool comes with Debian's prometheus package; run as root, this installs it when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

policy=/usr/sbin/policy-rc.d
own_policy=""
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  if [ -n "$own_policy" ]; then rm -f "$policy"; fi
}
trap cleanup EXIT

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's prometheus package for promtool"
    # The package's maintainer scripts would start a Prometheus on port 9090: a policy-rc.d that answers 101
    # forbids starting services while it installs (Debian's switch for this); it goes again if it was ours.
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale (a fresh container): update them only when the install needs it.
    apt-get install -y -q --no-install-recommends prometheus \
      || { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; }
    command -v promtool >/dev/null || { echo "the prometheus package installed no promtool on PATH" >&2; exit 1; }
  else
    echo "promtool is missing: install Debian's prometheus package first (sudo apt-get install prometheus)" >&2
    exit 1
  fi
fi

# The config names its token file relatively (comfyhub-metrics-token beside it: /etc/prometheus/ once installed)
# and promtool wants the file to exist, so check a copy beside a stand-in token.
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$work/"
echo "stand-in-token" >"$work/comfyhub-metrics-token"
promtool check config "$work/prometheus.yml"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
