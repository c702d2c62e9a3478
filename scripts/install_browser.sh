#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver (packages chromium, chromium-driver) for the play-page
# browser tests (tests/test_play.py). Idempotent and quiet: does nothing when both are installed.
# Needs root for apt-get; as another user it prints the command to run and exits 1.
set -euo pipefail

missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
[[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  echo "install_browser: missing ${missing[*]}; as root run:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_browser: installing ${missing[*]} with apt-get" >&2
apt-get update -qq >/dev/null
# Install both packages together so their versions always match.
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
  2> >(grep -v "^debconf: delaying package configuration" >&2)
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null | head -n1); $(/usr/bin/chromedriver --version 2>/dev/null | head -n1)" >&2
