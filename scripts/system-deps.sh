#!/usr/bin/env bash
# Install the Debian packages `make test` drives for real, and only those missing:
#   python3-venv  `python3 -m venv` on Debian (its python3 ships without ensurepip)
#   chromium      browser tests (Playwright drives /usr/bin/chromium)
#   redis-server  Redis backplane tests
#   nodejs        the browser client's unit tests (node --test)
#   nginx-light   tests/test_proxy.py (tether behind nginx)
#   iproute2, nftables  the half-open dead-peer test in a network namespace (needs root)
#
# A package counts as present when dpkg lists it as installed, or when its program
# is at its absolute path (/usr/sbin is not on a normal user's PATH). Runs as root,
# or through sudo; with neither, it prints what to install and exits 1.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
need=()

installed() {  # dpkg's own record, not a PATH lookup
  [ -x /usr/bin/dpkg-query ] &&
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

require() {  # package, then the absolute paths that also satisfy it
  local pkg=$1 path
  shift
  installed "$pkg" && return 0
  for path in "$@"; do
    [ -x "$path" ] && return 0
  done
  need+=("$pkg")
}

# python3-venv: unless the Python that `make` uses can bootstrap pip itself (a
# python.org or pyenv build has ensurepip; Debian's python3 needs this package).
if ! installed python3-venv && ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
require chromium /usr/bin/chromium
require redis-server /usr/bin/redis-server
require nodejs /usr/bin/node
require nginx-light /usr/sbin/nginx
require iproute2 /usr/sbin/ip /usr/bin/ip /sbin/ip /bin/ip
require nftables /usr/sbin/nft

if [ ${#need[@]} -eq 0 ]; then
  echo "system-deps: nothing to install"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif [ -x /usr/bin/sudo ]; then
  SUDO=(/usr/bin/sudo)
else
  echo "system-deps: missing Debian packages: ${need[*]}" >&2
  echo "system-deps: not root and no sudo; as root, run:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
fi
if [ ! -x /usr/bin/apt-get ]; then
  echo "system-deps: missing ${need[*]} and no apt-get (not Debian?): install them yourself" >&2
  exit 1
fi

echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
