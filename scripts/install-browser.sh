#!/usr/bin/env bash
# Headless Chromium for the report tests (tests/test_report_browser.py): Debian's chromium and its chromedriver.
# Needs root (apt-get); idempotent: once both are there, it only checks. Nothing else is downloaded: Selenium is
# given the driver's path, so its driver manager never runs.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[install-browser] not root: cannot apt-get install chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q chromium chromium-driver fonts-dejavu-core
echo "[install-browser] $(chromium --version 2>/dev/null | head -1), $(chromedriver --version | head -1)"
