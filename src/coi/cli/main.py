"""coi's command line: parse flags, call one handler, print errors once.

The parser only turns flags into keyword arguments; each handler lives in
``coi.cli.commands.<module>`` and is imported only when its command runs, so
``coi --version`` and ``coi list`` do not pay for modules they do not use.
"""

from __future__ import annotations

import os
import sys

from coi import version_text


def main(argv: list[str] | None = None) -> int:
    """Run coi with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    args = sys.argv[1:] if argv is None else argv
    # Fast path: the version needs neither argparse nor any other module. Arguments
    # after ``coi version`` are ignored, as code-on-incus does.
    if args and (args[0] == "version" or (args[0] in ("--version", "-v") and len(args) == 1)):
        print(version_text())
        return 0
    return _run(args)


def _run(args: list[str]) -> int:
    from coi.cli.context import Context
    from coi.cli.parser import build_parser, english_messages, normalise
    from coi.errors import CoiError

    command = next((a for a in args if not a.startswith("-")), None)
    with english_messages():
        parser = build_parser(only=command)
        ns = _parse(parser, args, normalise)  # exits 2 on usage errors
    kwargs = dict(vars(ns))
    handler_ref = kwargs.pop("handler", None)
    if handler_ref is None:
        parser.print_help(sys.stderr)
        return 2
    ctx = Context.from_namespace(kwargs)
    debug = kwargs.pop("debug_traceback", False) or os.environ.get("COI_DEBUG") == "1"
    try:
        handler = _resolve(handler_ref)
        code = handler(ctx, **kwargs)
        return 0 if code is None else int(code)
    except CoiError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        ctx.ui.error(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        ctx.ui.error("interrupted")
        return 130
    except BrokenPipeError:
        # Output piped into something that closed early (``coi list | head``).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
        if debug:
            import traceback

            traceback.print_exc()
        ctx.ui.error(f"unexpected failure: {exc.__class__.__name__}: {exc}",
                     None if debug else "run again with --debug-traceback (or COI_DEBUG=1) and report it")
        return 1


def _parse(parser, args: list[str], normalise):
    """Parse flags; what follows the first ``--`` is the command of run/exec,
    taken verbatim (flags of the command are never read as coi's)."""
    if "--" in args:
        i = args.index("--")
        ns = parser.parse_args(normalise(args[:i]))
        if hasattr(ns, "command"):
            # ``coi run make -- x``: the command began before the ``--``, which is its own.
            ns.command = [*ns.command, "--", *args[i + 1:]] if ns.command else args[i + 1:]
            return ns
    return parser.parse_args(normalise(args))


def _resolve(ref: str):
    """Import ``module:function`` from ``coi.cli.commands`` lazily."""
    import importlib

    module_name, _, func = ref.partition(":")
    module = importlib.import_module(f"coi.cli.commands.{module_name}")
    return getattr(module, func)
