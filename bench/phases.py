"""Where one coi command spends its time: run it in-process with its phases timed.

    python phases.py OUT.json -- COI-ARGS...

Run with coi's own interpreter (run.py does). coi's functions are wrapped as
their modules are imported, so nothing is imported that coi would not import
itself. Time is *exclusive*: while a nested phase runs (``start`` inside
``wait ready``), the time is the nested phase's. Every REST request is logged
with the phase it belongs to. What no phase claims is ``other`` (argument
parsing, rendering, glue). The parent adds the interpreter start (spawn to the
first line here) and the exit (the JSON written to the process end).

A target that does not exist in the installed coi is reported in the JSON
(``missing_targets``; bench/run.py refuses such a result) and a unit test
resolves every target, so a rename cannot silently drop a phase.
"""

import time  # builtin modules only before the clock starts: nothing else is loaded yet
import sys

T0_WALL = time.time()
T0 = time.perf_counter()

# module -> [(attribute, phase, nest)]. ``nest`` False: counted only when no other
# phase is running (``Incus.stop`` inside ``remove_container`` belongs to delete).
# ``*``: every function the module defines (modules being written by others).
TARGETS = {
    "coi.config.load": [("load_config", "config", True)],
    "coi.sessions.lifecycle": [("use_shift", "shift check", True),
                               ("push_credentials", "credential copy", True),
                               ("restore_state", "restore state", True)],
    "coi.sessions.containers": [("open_session", "slot allocation", True), ("create_container", "create", True),
                                ("ensure_running", "wait ready", True), ("remove_container", "delete", True),
                                ("list_containers", "list instances", True)],
    "coi.sessions.tmux": [("has_tmux_session", "tmux check", True), ("start_tmux", "tmux start", True)],
    "coi.incus.client": [("Incus.start", "start", True), ("Incus.stop", "stop", False),
                         ("Incus.publish", "publish", True), ("Incus.create_snapshot", "snapshot create", True),
                         ("Incus.restore_snapshot", "snapshot restore", True)],
    "coi.sessions.state": [("save_session", "save", True)],
    "coi.cli.render": [("render_sessions", "render", True)],
    "coi.images.builder": [("Builder.launch", "launch builder", True), ("Builder.remove", "delete builder", True)],
    "coi.images.dns": [("wait_for_network", "wait network", True)],
    "coi.images.run": [("run_in_builder", "exec in builder", True)],
    "coi.images.publish": [("unpack", "unpack image", True)],
    "coi.images.bootstrap": [("ensure_base", "base image check", True)],
    "coi.host.doctor": [("*", "doctor checks", True)],
    "coi.network.attach": [("pin_nic", "pin the address", True),
                           ("find_attachment", "network: find the address (waits for DHCP unless pinned)", True)],
    "coi.network.dns": [("resolve_allowed", "network: resolve allowed domains", True)],
    # The allowlist by name: coi's proxy started for the session (mitmproxy's import is most
    # of it), or found running for another one.
    "coi.network.proxy": [("ensure_running", "network: coi's proxy (start, or find it running)", True)],
}
# Every other function of the network package counts as network set-up.
NETWORK_MODULES = ("coi.network",)
NETWORK_PHASE = "network rules"

_stack = [["other", T0]]
_missing = []  # targets not found in their module: a rename that must not go unnoticed
_totals = {}
_calls = {}
_rest = []


def _enter(phase):
    now = time.perf_counter()
    top = _stack[-1]
    _totals[top[0]] = _totals.get(top[0], 0.0) + now - top[1]
    _stack.append([phase, now])
    _calls[phase] = _calls.get(phase, 0) + 1


def _leave():
    now = time.perf_counter()
    phase, since = _stack.pop()
    _totals[phase] = _totals.get(phase, 0.0) + now - since
    _stack[-1][1] = now


def _timed(func, phase, nest):
    def wrapper(*args, **kwargs):
        if not nest and len(_stack) > 1:
            return func(*args, **kwargs)
        _enter(phase)
        try:
            return func(*args, **kwargs)
        finally:
            _leave()
    wrapper.__wrapped__ = func
    wrapper.__name__ = getattr(func, "__name__", "wrapped")
    return wrapper


def _logged_raw(func):
    def raw(self, method, path, *args, **kwargs):
        start = time.perf_counter()
        try:
            return func(self, method, path, *args, **kwargs)
        finally:
            _rest.append((_stack[-1][0], method, path, time.perf_counter() - start))
    return raw


def _patch(module):
    name = module.__name__
    targets = list(TARGETS.get(name, []))
    if name.startswith(NETWORK_MODULES):
        targets.append(("*", NETWORK_PHASE, True))
    named = {attr for attr, _, _ in targets}
    for attr, phase, nest in targets:
        if attr == "*":  # every function of the module not given a phase of its own
            for key, value in list(vars(module).items()):
                if (callable(value) and getattr(value, "__module__", None) == name
                        and not isinstance(value, type) and key not in named):
                    setattr(module, key, _timed(value, phase, nest))
            continue
        holder, method, func = resolve(module, attr)
        if func is None:
            _missing.append(f"{name}:{attr}")
        else:
            setattr(holder, method, _timed(func, phase, nest))
    if name == "coi.incus.client":
        module.Incus.raw = _logged_raw(module.Incus.raw)


def resolve(module, attr):
    """(holder, name, function) of ``attr`` (``func`` or ``Class.method``) in ``module``;
    the function is None when the module has no such thing."""
    owner, _, method = attr.rpartition(".")
    holder = getattr(module, owner, None) if owner else module
    return holder, method, getattr(holder, method, None) if holder is not None else None


class _Patcher:
    """A meta-path finder that patches target modules right after they execute."""

    @staticmethod
    def find_spec(fullname, path, target=None):
        if fullname not in TARGETS and not fullname.startswith(NETWORK_MODULES):
            return None
        finder = next(f for f in sys.meta_path if getattr(f, "__name__", "") == "PathFinder")
        spec = finder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _patch(module)
        spec.loader.exec_module = exec_module
        return spec


def _timed_imports():
    import builtins
    import importlib

    builtins.__import__ = _timed(builtins.__import__, "imports", True)
    importlib.import_module = _timed(importlib.import_module, "imports", True)


def main():
    out = sys.argv[1]
    args = sys.argv[sys.argv.index("--") + 1:]
    sys.meta_path.insert(0, _Patcher)
    _timed_imports()
    import subprocess  # coi imports it too (run, build); its own cost counts as imports

    subprocess.Popen.__init__ = _timed(subprocess.Popen.__init__, "subprocesses", False)
    subprocess.Popen.wait = _timed(subprocess.Popen.wait, "subprocesses", False)
    sys.argv = ["coi", *args]
    code = 1
    try:
        from coi.cli.main import main as coi_main

        code = coi_main(args)
    finally:
        end = time.perf_counter()
        _totals["other"] = _totals.get("other", 0.0) + end - _stack[-1][1]
        import json

        with open(out, "w") as fh:
            json.dump({"t0_wall": T0_WALL, "end_wall": T0_WALL + (end - T0), "exit_code": code,
                       "phases": {k: {"seconds": v, "calls": _calls.get(k, 0)} for k, v in _totals.items()},
                       "missing_targets": _missing,
                       "rest": [{"phase": p, "method": m, "path": u, "seconds": s} for p, m, u, s in _rest]},
                      fh)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
