"""coi's state directory (``[paths] sessions_dir``, ``~/.coi`` by default).

It holds saved sessions, network records, logs and locks: what coi reads back
and acts on later. It must be out of every container's reach: owned by the
user, mode 0700, and neither inside nor around a workspace or a mount source
(a container could then write the records coi trusts).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from coi.errors import CoiError

STATE_MODE = 0o700
SUBDIRS = ("network", "logs", "locks", "timers")
OWN_DIR_HINT = "set [paths] sessions_dir in your own config to a directory of your own"


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_state_dir(path: Path, *, exposed: Iterable[Path] = ()) -> Path:
    """Make sure ``path`` exists and is the user's alone; returns it.

    ``exposed``: host directories a container sees (the workspace, mount
    sources, storage): the state directory may not overlap any of them.
    Created when missing (mode 0700); an existing one of the user's with
    wider modes is narrowed; anything else is refused.
    """
    real = Path(os.path.realpath(path))
    for where in exposed:
        seen = Path(os.path.realpath(where))
        storage = real / "storage"  # [paths] storage_dir's default: mounted on purpose, holds no state
        if _overlaps(real, seen) and not (seen == storage or storage in seen.parents):
            raise CoiError(f"coi's state directory {path} is inside or around {where}, which a container can "
                           "write", "set [paths] sessions_dir in your own config to a directory outside "
                           "every workspace and mount")
    try:
        real.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
        st = real.stat()
    except OSError as exc:
        raise CoiError(f"cannot use coi's state directory {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CoiError(f"coi's state directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise CoiError(f"coi's state directory {path} belongs to uid {st.st_uid}, not to you", OWN_DIR_HINT)
    if stat.S_IMODE(st.st_mode) != STATE_MODE:
        os.chmod(real, STATE_MODE)
    for name in SUBDIRS:
        sub = real / name
        if sub.is_symlink():
            raise CoiError(f"{sub} is a symbolic link; coi keeps its state only in directories of its own",
                           f"remove {sub}")
        if sub.is_dir():
            sub_st = sub.stat()
            if sub_st.st_uid != os.geteuid():
                raise CoiError(f"{sub} belongs to uid {sub_st.st_uid}, not to you", f"remove {sub}")
            if stat.S_IMODE(sub_st.st_mode) != STATE_MODE:
                os.chmod(sub, STATE_MODE)
    return path
