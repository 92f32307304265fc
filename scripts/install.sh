#!/usr/bin/env bash
# Install coi from this checkout and make the host ready for it (run as root).
#
#   sudo scripts/install.sh            # coi into /opt/coi, 'coi' on PATH, then 'coi setup'
#   sudo scripts/install.sh --build    # the same, then build the coi image when it is missing
#   sudo scripts/install.sh --test     # the same as the first, plus the test dependencies
#
# coi's egress proxy (mitmproxy, for [network] allowlist_by = "name") is installed too.
#
# Safe to run again: the virtual environment is reused, coi is reinstalled
# from the checkout, and 'coi setup' changes only what is missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${COI_PREFIX:-/opt/coi}
extras="[proxy]"
build=no
case "${1:-}" in
  --test) extras="[test,proxy]" ;;
  --build) build=yes ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "Error: scripts/install.sh must run as root (it installs packages and configures Incus)" >&2
  echo "Hint: sudo $0 $*" >&2
  exit 1
fi

# coi runs on the distribution's Python 3.11+, in a venv of its own.
if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "Installing python3-venv..."
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv python3-pip >/dev/null
fi
# The tests also drive the shells coi completes for (bash is there; zsh and fish may not be),
# the network tests' lab makes its certificates with openssl, the privileged helper's
# tests need sudo from the start (coi setup --user, which installs it too, runs later), and
# the SSH agent forwarding tests run a real agent with a key of their own (openssh-client).
if [ "$extras" != "[proxy]" ] && ! { command -v zsh && command -v fish && command -v openssl && command -v sudo \
    && command -v ssh-agent && command -v ssh-keygen; } >/dev/null; then
  echo "Installing zsh, fish, openssl, sudo and openssh-client for the tests..."
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends zsh fish openssl sudo openssh-client \
    >/dev/null
fi
if [ ! -x "$prefix/bin/python" ]; then
  echo "Creating $prefix..."
  /usr/bin/python3 -m venv "$prefix"
fi
echo "Installing coi from $repo into $prefix..."
"$prefix/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$repo$extras"
# The launcher pip generates imports 're' (18 ms, more than Python's own start);
# coi's needs nothing but its entry point.
rm -f /usr/local/bin/coi
# -I: isolated, so no PYTHONPATH, user site or current directory (a cloned project
# may hold a package named coi) is ever on the path of the coi the user runs.
cat > /usr/local/bin/coi <<LAUNCHER
#!$prefix/bin/python -I
import os, sys
from coi.cli.main import main
code = main()
try:
    sys.stdout.flush()
    sys.stderr.flush()
finally:
    os._exit(code)  # skip interpreter tear-down (about 30 ms): coi has nothing left to clean up
LAUNCHER
chmod 0755 /usr/local/bin/coi

coi setup
if [ "$build" = yes ] && ! coi image exists coi; then
  coi build
fi
