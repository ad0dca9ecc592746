#!/usr/bin/env bash
# Debian's chromium, for the service page's browser tests (Playwright drives it; Playwright's own browser
# download needs the internet). Installed once; a machine that has it returns at once.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then
    apt=(apt-get)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt=(sudo apt-get)
else
    # The other suites still run; the browser test then fails saying what is missing.
    echo "warning: chromium is missing and this user cannot install it: run 'apt-get install chromium' as root" >&2
    exit 0
fi
echo "installing Debian's chromium for the browser tests (once)"
"${apt[@]}" update -q
DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -q chromium
