"""Building the coi image and custom images.

A build launches a throw-away builder container from a base image, runs named
steps in it (their output streamed to ``log`` and saved to
``<sessions_dir>/logs/build-<alias>.log``), stops it, publishes it under the
alias and deletes the builder. When a step fails, or the user presses Ctrl+C,
the builder and any image published on the way are removed, and an existing
image is only replaced once its successor has been published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from coi import __version__
from coi.errors import CoiError, ConflictError
from coi.images.builder import Builder
from coi.images.dns import NetworkNotReady, wait_for_network
from coi.images.inputs import coi_inputs_hash, coi_script, host_ca_files, normalise_tools, sha
from coi.images.log import BuildLog, Log, log_path
from coi.images.manage import human_size, now_iso
from coi.images.progress import Steps, elapsed
from coi.images.publish import publish_builder, unpack
from coi.images.refs import COI_ALIAS, Base, check_alias, local_base, parse_base
from coi.images.run import capture, run_in_builder

if TYPE_CHECKING:
    from coi.incus import IncusClient

# The steps of coi-image.sh, in order: (argument, what the user sees).
COI_STEPS: tuple[tuple[str, str], ...] = (
    ("packages", "Install base packages (git, curl, build tools, python3, tmux, ...)"),
    ("nodejs", "Install Node.js (22 or newer) and npm"),
    ("tmux", "Configure tmux for the agents"),
    ("gh", "Install the GitHub CLI"),
    ("docker", "Install Docker"),
    ("user", "Create user code"),
    ("power", "Install poweroff/shutdown/reboot for code"),
    ("tools", "Install agent tools"),
    ("verify", "Check that every tool runs"),
    ("cleanup", "Clean caches"),
)

_SCRIPT_PATH = "/root/coi-build-script"
_COI_SCRIPT_PATH = "/root/coi-image.sh"
# Resets what must differ per container; run as the last step of every build.
_FINALIZE = (
    "rm -f /root/coi-build-script /root/coi-image.sh; "
    "if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi; "
    "rm -f /var/lib/dbus/machine-id; "
    "if command -v apt-get >/dev/null; then apt-get clean; fi; sync"
)


class BuildError(CoiError):
    """A build step failed; the message names the step and the log file."""


@dataclass
class _Build:
    """One build: its log file, its steps, its builder, and what the build functions do with them.

    ``log`` gets one line per step (and the build's own messages); the steps'
    own output (apt, npm, pip) goes to the log file, and to ``output`` too
    (``--verbose``); without ``output``, a failure shows the end of the log.
    """

    client: IncusClient
    alias: str
    log: BuildLog
    steps: Steps
    builder: Builder
    output: Log | None = None
    dns_repaired: bool = False

    def say(self, line: str) -> None:
        self.log.say(line)

    def step(self, title: str) -> None:
        self.steps.begin(title)

    def fail(self, detail: str, hint: str | None = None) -> BuildError:
        """The error of the running step (``detail``: what went wrong), also noted in the log."""
        message = (f"build of image {self.alias} failed at step '{self.steps.current}': {detail}; "
                   f"log: {self.log.path}")
        if self.output is None:  # not shown as it ran: the end of the log says why
            for line in self.log.tail(15):
                self.log.log("    | " + line)
        self.log.write("# " + message)
        return BuildError(message, hint or "fix the cause shown above (and in the log), then build again")

    def run(self, command: list[str], *, env: Mapping[str, str] | None = None, idempotent: bool = False) -> None:
        """Run ``command`` as root in the builder, streaming its output; raise on failure."""
        with self.steps.spinner():
            try:
                code = run_in_builder(self.client, self.builder.name, command, env=env, record=self.log.write,
                                      output=self.output, idempotent=idempotent)
            except CoiError as exc:
                raise self.fail(exc.message, exc.hint) from None
        if code != 0:
            raise self.fail(f"exit code {code}")

    def push(self, path: str, content: bytes, *, mode: int) -> None:
        self.client.push_file(self.builder.name, path, content, mode=mode)

    def launch(self, base: Base) -> Base:
        self.step(f"Launch builder {self.builder.name} from {base.ref}")
        return self.builder.launch(base, say=self.say)

    def wait_network(self) -> None:
        self.step("Wait for the network (DHCP and DNS)")
        try:
            self.dns_repaired = wait_for_network(self.client, self.builder.name, say=self.say)
        except NetworkNotReady as exc:
            raise self.fail(exc.message) from None

    def finish(self, *, properties: Mapping[str, str], replace: bool, description: str) -> dict[str, Any]:
        """Finalise, stop, publish, point the alias (replacing the old image last), delete the builder."""
        self.step("Finalise, stop and publish the image")
        self.run(["sh", "-c", _FINALIZE], idempotent=True)
        fingerprint = publish_builder(self.client, self.builder, alias=self.alias, properties=properties,
                                      replace=replace, description=description, say=self.say)
        self.builder.remove()
        unpack(self.client, fingerprint, name=f"{self.builder.name}-unpack", say=self.say)
        image = self.client.image(fingerprint)
        seconds = self.steps.seconds()
        size = int(image.get("size") or 0)
        self.say(f"Image {self.alias} ready: fingerprint {fingerprint[:12]}, {human_size(size)}, "
                 f"built in {elapsed(seconds)} (log: {self.log.path})")
        return {"alias": self.alias, "fingerprint": fingerprint, "size": size, "seconds": round(seconds, 1),
                "properties": dict(image.get("properties") or {}), "log": str(self.log.path),
                "dns_repaired": self.dns_repaired}


def _new_build(client: IncusClient, alias: str, *, config: Any, total: int, log: Log, output: Log | None,
               progress: Log | None) -> _Build:
    build_log = BuildLog(log_path(config, alias), log)
    return _Build(client, alias, build_log, Steps(total, build_log.say, progress), Builder(client), output)


def _run_build(build: _Build, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` with the log open; on any failure or Ctrl+C the builder is abandoned."""
    build.log.open(f"# coi {__version__}: build of image {build.alias}, started {now_iso()}")
    try:
        return body()
    except KeyboardInterrupt:
        build.builder.abandon(interrupted=True, say=build.say)
        raise
    except BuildError:
        build.builder.abandon(interrupted=False, say=build.say)
        raise
    except CoiError as exc:  # an Incus failure on the way: say which step, and where the log is
        build.builder.abandon(interrupted=False, say=build.say)
        raise build.fail(exc.message, exc.hint) from None
    except BaseException:
        build.builder.abandon(interrupted=False, say=build.say)
        raise
    finally:
        build.log.close()


def _refuse_existing(client: IncusClient, alias: str, force: bool, command: str) -> None:
    if not force and client.image_exists(alias):
        raise ConflictError(f"image {alias} already exists", f"use '{command} --force' to replace it")


def _read_script(script: Path) -> bytes:
    try:
        return script.read_bytes()
    except FileNotFoundError:
        raise CoiError(f"build script {script} does not exist") from None
    except IsADirectoryError:
        raise CoiError(f"build script {script} is a directory, not a file") from None
    except OSError as exc:
        raise CoiError(f"cannot read build script {script}: {exc.strerror or exc}") from None


def build_custom(client: IncusClient, *, name: str, script: Path, base: str | None, force: bool, config: Any,
                 log: Log, output: Log | None = None, progress: Log | None = None) -> dict[str, Any]:
    """Build image ``name``: ``script`` run as root in a builder from ``base`` (default: coi)."""
    check_alias(name)
    script = Path(script)
    content = _read_script(script)
    parsed = parse_base(base, default=COI_ALIAS)
    _refuse_existing(client, name, force, "coi build custom")
    if parsed.remote is None:
        parsed = local_base(client, parsed, log)
    build = _new_build(client, name, config=config, total=4, log=log, output=output, progress=progress)

    def body() -> dict[str, Any]:
        build.say(f"Building image {name} from {parsed.ref} with {script} (log: {build.log.path})")
        used = build.launch(parsed)
        build.wait_network()
        build.step(f"Run {script.name} as root")
        build.push(_SCRIPT_PATH, content, mode=0o700)
        command = [_SCRIPT_PATH] if content.startswith(b"#!") else ["/bin/bash", _SCRIPT_PATH]
        build.run(command, env={"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"})
        properties = {"coi.kind": "custom", "coi.version": __version__, "coi.base": used.ref,
                      "coi.script": script.name, "coi.script_hash": sha([content]),
                      "coi.inputs": sha([content, used.ref.encode()]), "coi.built_at": now_iso()}
        return build.finish(properties=properties, replace=force, description=f"coi custom image {name}")

    return _run_build(build, body)


def build_coi(client: IncusClient, *, force: bool, tools: Iterable[str] | None = None, config: Any, log: Log,
              output: Log | None = None, progress: Log | None = None, alias: str = COI_ALIAS) -> dict[str, Any]:
    """Build the ``coi`` image (under ``alias``): the tools of the contract plus the chosen agent
    tools (None: those of ``[build] tools``)."""
    parsed = parse_base(config.build.base)
    tools = normalise_tools(config.build.tools if tools is None else tools)
    _refuse_existing(client, alias, force, "coi build")
    if parsed.remote is None:
        parsed = local_base(client, parsed, log)
    script = coi_script().read_bytes()
    inputs = coi_inputs_hash(tools=tools, config=config, script=script)
    ca_files = host_ca_files()
    build = _new_build(client, alias, config=config, total=3 + len(COI_STEPS), log=log, output=output,
                       progress=progress)
    env = {"CODE_UID": str(config.incus.code_uid), "COI_TOOLS": " ".join(tools), "HOME": "/root"}

    def body() -> dict[str, Any]:
        build.say(f"Building image {alias} from {parsed.ref} with tools {', '.join(tools)} "
                  f"(log: {build.log.path})")
        used = build.launch(parsed)
        build.wait_network()
        build.push(_COI_SCRIPT_PATH, script, mode=0o700)
        for path in ca_files:
            build.push(f"/usr/local/share/ca-certificates/coi-host-{path.name}", path.read_bytes(), mode=0o644)
        for arg, title in COI_STEPS:
            build.step(title + (f": {', '.join(tools)}" if arg == "tools" else ""))
            build.run(["/bin/bash", _COI_SCRIPT_PATH, arg], env=env)
        _, node = capture(client, build.builder.name, ["/usr/local/bin/node", "--version"])
        properties = {"coi.kind": "coi", "coi.version": __version__, "coi.base": used.ref,
                      "coi.node": node.strip(),
                      "coi.script_hash": sha([script]), "coi.inputs": inputs, "coi.tools": ",".join(tools),
                      "coi.code_uid": str(config.incus.code_uid), "coi.built_at": now_iso()}
        return build.finish(properties=properties, replace=force, description=f"coi image ({', '.join(tools)})")

    return _run_build(build, body)
