#!/usr/bin/env bash
# Static plot export (kaleido >= 1) drives a system Chromium. Install Debian's package
# when it is missing and we may (root, apt-get present); otherwise say how.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
   || command -v google-chrome >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for static plot export ..."
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    && exit 0
fi
echo "warning: no Chromium found; PNG/SVG/PDF export will fail (HTML works)." >&2
echo "         install one, e.g.: sudo apt-get install chromium" >&2
exit 0
