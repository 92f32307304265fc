#!/usr/bin/env bash
# Set up everything (packages, Incus, coi) and run coi's whole test suite
# against the real Incus daemon. Run as root; extra arguments go to pytest.
#
#   sudo scripts/test.sh
#   sudo scripts/test.sh -m unit -x
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/install.sh" --test

cd "$repo"
# The tests import the installed coi, not the checkout, so they test what users get.
exec "${COI_PREFIX:-/opt/coi}/bin/python" -m pytest -p no:cacheprovider "$@"
