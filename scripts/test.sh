#!/usr/bin/env bash
# Set up (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive Debian's chromium (Playwright cannot download browsers here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser tests"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    echo "the browser tests need /usr/bin/chromium: run 'sudo apt-get install chromium' first" >&2
  fi
fi
# The alerting test starts Debian's prometheus; it and promtool come from one package.
bash scripts/install-prometheus.sh || true
exec .venv/bin/python -m pytest "$@"
