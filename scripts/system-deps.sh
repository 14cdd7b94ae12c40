#!/usr/bin/env bash
# What the suite needs beyond pip, checked (and installed when possible) by `make test` before the
# suite starts: Debian's Chromium and ChromeDriver for tests/test_browser.py (a headless browser
# driven by Selenium; no browser is downloaded at run time); PostgreSQL, iproute2 and util-linux
# for infra/local/bed.sh and tests/test_bed.py (the multi-node test bed in Linux namespaces).
#
# Missing and running as root with apt-get: installs them. Otherwise: stops with one line naming
# the packages to install, and exit status 1.
set -euo pipefail

# "command Debian-package" pairs: a package is needed when its command is not on PATH (a command
# given as a path is checked as a file: Debian keeps PostgreSQL's server tools off PATH).
NEEDED=(
  "chromium chromium"
  "chromedriver chromium-driver"
  "/usr/lib/postgresql/*/bin/initdb postgresql"
  "ip iproute2"
  "unshare util-linux"
  "nsenter util-linux"
)

missing_packages() {
  local pair cmd pkg
  for pair in "${NEEDED[@]}"; do
    read -r cmd pkg <<< "$pair"
    if [[ "$cmd" == /* ]]; then
      compgen -G "$cmd" > /dev/null || echo "$pkg"
    else
      command -v "$cmd" > /dev/null 2>&1 || echo "$pkg"
    fi
  done
}

missing=$(missing_packages | sort -u | xargs)
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
  echo "installing the suite's system packages: $missing (apt-get)"
  log=$(mktemp)
  # shellcheck disable=SC2086  # $missing is a list of package names
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) > "$log" 2>&1; then
    rm -f "$log"
    missing=$(missing_packages | sort -u | xargs)
    [ -z "$missing" ] && exit 0
  else
    rm -f "$log"
  fi
fi

echo "make test needs system packages that are not installed: run 'apt-get install $missing' as root, then make test again" >&2
exit 1
