"""coi: run AI coding agents inside isolated Incus system containers."""

__version__ = "0.1.0"
