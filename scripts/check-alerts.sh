#!/usr/bin/env bash
# Check deploy/prometheus/ with promtool: the scrape config, the alert rules, and the rules' unit tests
# (alerts_test.yml). promtool comes with Debian's prometheus package (scripts/install-prometheus.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash scripts/install-prometheus.sh

# The config names its token file relatively (comfyhub-metrics-token beside it: /etc/prometheus/ once installed)
# and promtool wants the file to exist, so check a copy beside a stand-in token.
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$work/"
echo "stand-in-token" >"$work/comfyhub-metrics-token"
promtool check config "$work/prometheus.yml"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
