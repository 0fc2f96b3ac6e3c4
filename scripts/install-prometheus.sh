#!/usr/bin/env bash
# Debian's prometheus package, for promtool (scripts/check-alerts.sh) and the Prometheus the alerting test starts
# (tests/ops/test_alerting.py): installed when missing, if run as root with apt-get; otherwise it says what to do.
set -euo pipefail

policy=/usr/sbin/policy-rc.d
own_policy=""
trap 'if [ -n "$own_policy" ]; then rm -f "$policy"; fi' EXIT

if ! command -v promtool >/dev/null || [ ! -x /usr/bin/prometheus ]; then
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
    command -v promtool >/dev/null && [ -x /usr/bin/prometheus ] \
      || { echo "the prometheus package installed no promtool or prometheus" >&2; exit 1; }
  else
    echo "promtool or prometheus is missing: install Debian's prometheus package first (sudo apt-get install prometheus)" >&2
    exit 1
  fi
fi
