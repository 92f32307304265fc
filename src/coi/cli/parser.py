"""The argparse tree: flags become keyword arguments of one handler.

``handler`` names ``module:function`` in ``coi.cli.commands``; the module is
imported only when the command runs.
"""

from __future__ import annotations

import argparse

from coi import __version__


class _Parser(argparse.ArgumentParser):
    """argparse with coi's one-line error format (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage()
        self.exit(2, f"Error: {message}\nHint: run '{self.prog} --help' for usage\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only print results and errors")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="print more progress detail")
    p.add_argument("--debug-traceback", action="store_true", default=argparse.SUPPRESS,
                   help="show a Python traceback on errors (also COI_DEBUG=1)")


def _workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--workspace", metavar="PATH",
                   help="workspace directory (default: current directory)")


def _command(sub, name: str, handler: str, summary: str, example: str, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    p.set_defaults(handler=handler)
    _common(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coi",
        description="Run AI coding agents inside isolated Incus system containers.",
        epilog=(
            "commands by group:\n"
            "  host:      setup, doctor, config\n"
            "  other:     version\n\n"
            "example:\n  sudo coi setup && coi doctor"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--version", action="version", version=f"coi {__version__}")
    _common(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    _command(sub, "version", "host:version", "print the version", "coi version")

    p = _command(sub, "setup", "host:setup",
                 "make this host ready for coi (run as root; safe to repeat)", "sudo coi setup")
    p.add_argument("--ipv6", action="store_true", help="give the coi bridge IPv6 too (default: off)")
    p.add_argument("--user", metavar="NAME",
                   help="user to add to the Incus admin group (default: $SUDO_USER)")

    p = _command(sub, "doctor", "host:doctor",
                 "check that this host can run coi, with a fix for each problem", "coi doctor")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")

    p = _command(sub, "config", "config:show", "show the effective configuration",
                 "coi config show --format json")
    csub = p.add_subparsers(title="config commands", metavar="ACTION", parser_class=_Parser)
    q = _command(csub, "show", "config:show",
                 "print the effective configuration and where each value came from",
                 "coi config show --format toml")
    _workspace(q)
    q.add_argument("--format", choices=["toml", "json"], default="toml", help="output format (default: toml)")
    q = _command(csub, "path", "config:path", "list the configuration files consulted", "coi config path")
    _workspace(q)
    return parser
