"""``python -I -m coi.branches.spare STATE_DIR WORKSPACE``: make a workspace's spare copy in
the background (started by ``copies.refill_spare``); failures leave no spare, nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

from coi.branches.copies import make_spare
from coi.errors import CoiError


def main(argv: list[str]) -> int:
    state_dir, workspace = Path(argv[0]), Path(argv[1])
    try:
        make_spare(state_dir, workspace)
    except (CoiError, OSError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
