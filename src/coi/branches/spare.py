"""``python -I -m coi.branches.spare STATE_DIR WORKSPACE LOCK_FD``: make a workspace's spare
copy in the background (started by ``copies.refill_spare``, which hands over the spare's
lock as LOCK_FD: it is held until this process ends). A failure leaves no spare, nothing else."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from coi.branches.copies import make_spare
from coi.errors import CoiError


def main(argv: list[str]) -> int:
    state_dir, workspace, lock_fd = Path(argv[0]), Path(argv[1]), int(argv[2])
    os.nice(10)  # behind the sessions that run meanwhile
    try:
        make_spare(state_dir, workspace, locked=True)
    except (CoiError, OSError):
        return 1
    finally:
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
