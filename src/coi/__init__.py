"""coi: run AI coding agents inside isolated Incus system containers."""

__version__ = "0.1.0"


def version_text() -> str:
    """What ``coi version`` prints: the name and version as code-on-incus prints them, then
    the interpreter coi runs on (no module beyond ``sys`` is needed for it)."""
    import sys

    python = sys.version.split()[0]
    return f"code-on-incus (coi) v{__version__}\nPython {python} ({sys.executable})"
