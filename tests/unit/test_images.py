"""Image building and management logic, against a small in-memory fake Incus.

Build steps that the real code streams through ``incus exec`` run here as
local commands (``true``/``false``), so failures, clean-up and the order in
which aliases move can be checked without a daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coi import images
from coi.config import default_config
from coi.errors import CoiError, ConflictError, NotFoundError, OperationFailedError, UsageError
from coi.incus import EXEC_NOT_STARTED, ExecResult
from fake_incus import DEFAULT, FakeIncus

pytestmark = pytest.mark.unit


@dataclass
class Build:
    """How the builder behaves in one test (handlers of the shared FakeIncus)."""

    fail_remote: bool = False
    fail_step: str | None = None  # a command word whose step exits 3
    lose_step: str | None = None  # a command word whose first run Incus loses track of
    interrupt_step: str | None = None
    publish_error: Exception | None = None
    during_publish: Any = None  # called while the daemon "publishes"
    resolver_broken: bool = False  # getent fails until resolv.conf is rewritten
    resolv_conf: str = "nameserver 10.0.0.1\n"

    def create_instance(self, name, *, source=None, **kw):
        if source and source.get("server") and self.fail_remote:
            raise OperationFailedError(f"container {name}: Failed getting remote image info")
        return DEFAULT

    def publish(self, name, **kw):
        if self.publish_error:
            raise self.publish_error
        if self.during_publish:
            self.during_publish()
        return DEFAULT

    def exec(self, name, command, **kw):
        if command[:2] == ["getent", "hosts"]:
            return ExecResult(1 if self.resolver_broken else 0, "", "")
        if command == ["cat", "/etc/resolv.conf"]:
            return ExecResult(0, self.resolv_conf, "")
        if command == ["cat", "/proc/net/route"]:
            return ExecResult(0, ROUTES, "")
        if command[:2] == ["sh", "-c"] and "resolv.conf" in command[2]:
            self.resolv_conf = f"nameserver {command[-1]}\n"
            self.resolver_broken = False
            return ExecResult(0, "", "")
        return ExecResult(1, "", "")  # systemctl is-active ...: nothing runs

    def exec_argv(self, name, command, **kw):
        """A local stand-in for ``incus exec``: the step succeeds, fails or is interrupted."""
        text = " ".join(command)
        if self.interrupt_step and self.interrupt_step in text:
            raise KeyboardInterrupt
        if self.fail_step and self.fail_step in text:
            return ["sh", "-c", "echo step output; exit 3"]
        if self.lose_step and self.lose_step in text:
            self.lose_step = None
            return ["sh", "-c", f"echo 'Error: {EXEC_NOT_STARTED}'; exit 255"]
        return ["sh", "-c", "echo step output"]


def created(fake: FakeIncus) -> list[dict]:
    """Sources of the builders created (not of the container that unpacks the new image)."""
    return [dict(c.kwargs.get("source") or {}) for c in fake.called("create_instance") if not c[1].endswith("-unpack")]


def runs(fake: FakeIncus) -> list[tuple[str, ...]]:
    """The commands streamed through ``incus exec`` (build steps)."""
    return [tuple(c[2]) for c in fake.called("exec_argv")]


ROUTES = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
          "eth0\t00000000\t0100C30A\t0003\t0\t0\t1024\t00000000\n"
          "eth0\t0000C30A\t00000000\t0001\t0\t0\t1024\t00FFFFFF\n")


@pytest.fixture
def build() -> Build:
    return Build()


@pytest.fixture
def fake(monkeypatch, build):
    client = FakeIncus()
    client.add_image(["coi-base-debian-bookworm"], properties={"coi.kind": "base"})
    for method in ("create_instance", "publish", "exec", "exec_argv"):
        client.on(method, getattr(build, method))

    def ensure_base(c, suite, *, log, **kw):
        return f"coi-base-debian-{suite}"

    monkeypatch.setattr(images.bootstrap, "ensure_base", ensure_base)
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    return client


@pytest.fixture
def config(tmp_path):
    return default_config(env={"HOME": str(tmp_path)})


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "setup.sh"
    path.write_text("echo hi\n")
    return path


def _build(fake, config, script, **kw):
    lines: list[str] = []
    kw.setdefault("base", "coi-base-debian-bookworm")
    kw.setdefault("force", False)
    result = images.build_custom(fake, name=kw.pop("name", "coi-test-x"), script=script, config=config,
                                 log=lines.append, **kw)
    return result, lines


# --- bases -------------------------------------------------------------------


def test_unreachable_remote_falls_back_to_bootstrap(fake, build, config, script):
    build.fail_remote = True
    result, lines = _build(fake, config, script, base="images:debian/12")
    sources = created(fake)
    assert sources[0]["server"] == images.REMOTE_SERVER
    assert sources[1] == {"type": "image", "alias": "coi-base-debian-bookworm"}
    assert any("Could not reach the image server" in l and "falling back to bootstrap:debian/bookworm" in l
               for l in lines)
    assert result["properties"]["coi.base"] == "bootstrap:debian/bookworm"
    assert fake.instances_by_name == {}


def test_reachable_remote_is_used(fake, config, script):
    result, lines = _build(fake, config, script, base="images:ubuntu/24.04")
    assert [s.get("alias") for s in created(fake)] == ["ubuntu/24.04"]
    assert result["properties"]["coi.base"] == "images:ubuntu/24.04"
    assert not any("falling back" in l for l in lines)


def test_builders_get_nesting_config_and_coi_profile(fake, config, script):
    _build(fake, config, script)
    call, = [c for c in fake.called("create_instance") if not c[1].endswith("-unpack")]
    name, cfg, profiles = call[1], call.kwargs["config"], call.kwargs["profiles"]
    assert name.startswith("coi-test-build-")
    assert cfg == images.CONTAINER_CONFIG == {
        "boot.autostart": "false", "security.nesting": "true", "security.syscalls.intercept.mknod": "true",
        "security.syscalls.intercept.setxattr": "true"}
    assert profiles == ["coi"]


def test_missing_local_base_names_coi_build(fake, config, script):
    with pytest.raises(NotFoundError, match="base image 'coi' does not exist") as exc:
        _build(fake, config, script, base=None)
    assert "coi build" in exc.value.hint
    assert created(fake) == []


# --- refusals before any container ----------------------------------------------


def test_missing_script_is_refused_before_any_container(fake, config, tmp_path):
    with pytest.raises(CoiError, match="does not exist"):
        _build(fake, config, tmp_path / "nope.sh")
    with pytest.raises(CoiError, match="is a directory"):
        _build(fake, config, tmp_path)
    assert created(fake) == []


def test_existing_image_needs_force(fake, config, script):
    fake.add_image(["coi-test-x"])
    with pytest.raises(ConflictError, match="already exists") as exc:
        _build(fake, config, script)
    assert "--force" in exc.value.hint
    assert created(fake) == []


@pytest.mark.parametrize("name", ["", "has space", "remote:alias", "-dash"])
def test_bad_image_names_are_refused(fake, config, script, name):
    with pytest.raises(UsageError):
        _build(fake, config, script, name=name)


# --- failures and interrupts clean up -----------------------------------------------


def test_a_lost_finalise_step_runs_again_but_a_lost_script_does_not(fake, build, config, script):
    """Incus may lose track of a command it ran: the idempotent finalise step is run
    again; the user's script never is, and the build fails saying why."""
    build.lose_step = "apt-get clean"
    _build(fake, config, script)
    assert len([c for c in runs(fake) if "apt-get clean" in " ".join(c)]) == 2
    build.lose_step = "coi-build-script"
    with pytest.raises(images.BuildError, match="exit code 255"):
        _build(fake, config, script, name="coi-test-y")
    assert len([c for c in runs(fake) if c[-1] == "/root/coi-build-script"]) == 2  # 1 a build


def test_failing_step_names_step_and_log_and_leaves_nothing(fake, build, config, script):
    build.fail_step = "coi-build-script"
    with pytest.raises(images.BuildError) as exc:
        _build(fake, config, script)
    message = exc.value.message
    assert "Run setup.sh as root" in message and "exit code 3" in message
    log = images.log_path(config, "coi-test-x")
    assert str(log) in message
    assert "step output" in log.read_text()
    assert fake.instances_by_name == {}
    assert not fake.image_exists("coi-test-x")
    assert fake.called("publish") == []


def test_interrupt_removes_builder_and_reraises(fake, build, config, script):
    build.interrupt_step = "coi-build-script"
    with pytest.raises(KeyboardInterrupt):
        _build(fake, config, script)
    assert fake.instances_by_name == {}
    assert ("close",) in fake.calls


def test_failed_publish_leaves_no_builder(fake, build, config, script):
    build.publish_error = OperationFailedError("publish container: disk full")
    with pytest.raises(images.BuildError, match="failed at step 'Finalise, stop and publish the image': "
                                                 "publish container: disk full; log: "):
        _build(fake, config, script)
    assert fake.instances_by_name == {}
    assert not fake.image_exists("coi-test-x")


def test_force_replaces_old_image_only_after_publish(fake, config, script):
    old = fake.add_image(["coi-test-x"])
    result, _ = _build(fake, config, script, force=True)
    kinds = [c[0] for c in fake.calls]
    assert kinds.index("publish") < kinds.index("point_alias") < kinds.index("delete_image")
    assert ("delete_image", old) in fake.calls
    assert fake.image_alias("coi-test-x")["target"] == result["fingerprint"] != old


def test_failed_force_rebuild_keeps_old_image(fake, build, config, script):
    old = fake.add_image(["coi-test-x"])
    build.fail_step = "coi-build-script"
    with pytest.raises(images.BuildError):
        _build(fake, config, script, force=True)
    assert fake.image_alias("coi-test-x")["target"] == old
    assert fake.instances_by_name == {}


def test_force_keeps_old_image_that_has_other_aliases(fake, config, script):
    old = fake.add_image(["coi-test-x", "coi-test-pinned"])
    _build(fake, config, script, force=True)
    assert fake.image_alias("coi-test-pinned")["target"] == old


def test_result_and_properties(fake, config, script):
    result, lines = _build(fake, config, script)
    props = result["properties"]
    assert props["coi.kind"] == "custom"
    assert props["coi.base"] == "coi-base-debian-bookworm"
    assert props["coi.script_hash"] == images.sha([script.read_bytes()])
    assert props["coi.version"] and props["coi.built_at"].endswith("Z")
    assert result["alias"] == "coi-test-x" and result["size"] == 4096
    assert lines[-1].startswith("Image coi-test-x ready")
    assert [l for l in lines if l.startswith("[")][0].startswith("[1/4] Launch builder")


# --- DNS repair ------------------------------------------------------------------


def test_dead_stub_resolver_is_repaired_with_the_gateway(fake, build, config, script, monkeypatch):
    build.resolver_broken = True
    build.resolv_conf = "nameserver 127.0.0.53\noptions edns0\n"
    result, lines = _build(fake, config, script)
    assert result["dns_repaired"] is True
    assert build.resolv_conf == "nameserver 10.195.0.1\n"
    assert any("bridge's resolver 10.195.0.1" in l and "inside the image only" in l for l in lines)


def test_working_resolver_is_left_alone(fake, config, script):
    result, lines = _build(fake, config, script)
    assert result["dns_repaired"] is False
    assert not any("resolv.conf" in " ".join(c[2]) for c in fake.called("exec") if len(c[2]) > 2)


def test_broken_non_stub_resolver_fails_the_build(fake, build, config, script, monkeypatch):
    monkeypatch.setattr(images.dns, "_DNS_TIMEOUT", 0.2)
    build.resolver_broken = True
    build.resolv_conf = "nameserver 192.0.2.1\n"
    with pytest.raises(images.BuildError, match="names do not resolve"):
        _build(fake, config, script)
    assert fake.instances_by_name == {}


# --- the coi image ----------------------------------------------------------------


def test_coi_build_refuses_existing_image_and_runs_every_step(fake, config):
    fake.add_image(["coi"])
    with pytest.raises(ConflictError):
        images.build_coi(fake, force=False, tools=["claude"], config=config, log=lambda s: None)
    assert created(fake) == []
    lines: list[str] = []
    result = images.build_coi(fake, force=True, tools=["claude"], config=config, log=lines.append)
    steps = [c[-1] for c in runs(fake) if "/root/coi-image.sh" in c]
    assert steps == [arg for arg, _ in images.COI_STEPS]
    assert result["properties"]["coi.inputs"] == images.coi_inputs_hash(tools=["claude"], config=config)
    assert result["properties"]["coi.tools"] == "claude"
    assert "[13/13] Finalise, stop and publish the image" in " ".join(lines)


def test_coi_build_without_tools_takes_those_of_the_config(fake, config):
    result = images.build_coi(fake, force=False, config=config, log=lambda s: None)
    assert result["properties"]["coi.tools"] == ",".join(config.build.tools)


def test_coi_build_failure_names_the_script_step(fake, build, config):
    build.fail_step = "docker"
    with pytest.raises(images.BuildError, match="failed at step 'Install Docker'"):
        images.build_coi(fake, force=False, tools=["claude"], config=config, log=lambda s: None)
    assert fake.instances_by_name == {} and not fake.image_exists("coi")


# --- listing and clean-up ----------------------------------------------------------


def test_cleanup_images_deletes_old_ones_and_only_aliases_of_shared_images():
    client = FakeIncus()
    old = client.add_image(["app-1"], created="2026-01-01T00:00:00Z")
    shared = client.add_image(["app-2", "keep-me"], created="2026-01-02T00:00:00Z")
    new = client.add_image(["app-3"], created="2026-01-03T00:00:00Z")
    client.add_image(["unrelated"], created="2020-01-01T00:00:00Z")
    kept, deleted = images.cleanup_images(client, prefix="app-", keep=1)
    assert [r.alias for r in kept] == ["app-3"]
    assert sorted(r.alias for r in deleted) == ["app-1", "app-2"]
    assert old not in client.images_by_fp
    assert client.image_alias("keep-me")["target"] == shared and not client.image_exists("app-2")
    assert new in client.images_by_fp and client.image_exists("unrelated")


def test_list_images_filters_coi_images_and_prefix():
    client = FakeIncus()
    client.add_image(["coi"], properties={"coi.kind": "coi", "coi.version": "0.1.0"})
    client.add_image(["foreign"])
    client.add_image([])
    assert [r.alias for r in images.list_images(client)] == ["coi"]
    assert [r.alias for r in images.list_images(client, all=True)] == ["coi", "foreign", ""]
    assert [r.alias for r in images.list_images(client, all=True, prefix="fo")] == ["foreign"]
    assert images.list_images(client)[0].to_json()["coi.version"] == "0.1.0"


def test_delete_image_by_alias():
    client = FakeIncus()
    shared = client.add_image(["a", "b"])
    images.delete_image(client, "a")
    assert shared in client.images_by_fp and not client.image_exists("a")
    images.delete_image(client, "b")
    assert shared not in client.images_by_fp
    with pytest.raises(NotFoundError, match="image b does not exist"):
        images.delete_image(client, "b")


def test_publish_container_needs_a_stopped_container():
    client = FakeIncus()
    client.create_instance("box", start=True)
    with pytest.raises(ConflictError, match="running"):
        images.publish_container(client, container="box", alias="pub")
    client.stop("box")
    info = images.publish_container(client, container="box", alias="pub", description="d")
    assert info.alias == "pub" and info.properties["coi.kind"] == "published"
    with pytest.raises(ConflictError, match="already exists"):
        images.publish_container(client, container="box", alias="pub")


def test_no_dhcp_address_fails_the_network_step(fake, config, script, monkeypatch):
    monkeypatch.setattr(images.dns, "_NETWORK_TIMEOUT", 0.1)
    fake.on("instance_state", lambda name: {"network": {"eth0": {"addresses": []}}})
    with pytest.raises(images.BuildError, match=r"failed at step 'Wait for the network \(DHCP and DNS\)': "
                                                r"eth0 got no IPv4 address"):
        _build(fake, config, script)
    assert fake.instances_by_name == {}


def test_missing_incus_client_is_a_clear_build_error(fake, config, script, monkeypatch):
    fake.on("exec_argv", lambda name, command, **kw: ["coi-test-no-such-incus", *command])
    with pytest.raises(images.BuildError, match="'coi-test-no-such-incus' command is not installed") as exc:
        _build(fake, config, script)
    assert "coi setup" in exc.value.hint
    assert fake.instances_by_name == {}


def test_new_image_is_unpacked_once_so_the_first_launch_is_fast(fake, config, script):
    result, lines = _build(fake, config, script)
    unpack = [c for c in fake.called("create_instance") if c[1].endswith("-unpack")]
    assert [c.kwargs["source"] for c in unpack] == [{"type": "image", "fingerprint": result["fingerprint"]}]
    assert ("delete", unpack[0][1]) in fake.calls and fake.instances_by_name == {}
    assert any("Unpacking the image" in l for l in lines)


def test_ctrl_c_during_publish_waits_for_the_image_then_deletes_it(fake, build, config, script):
    import os
    import signal

    build.during_publish = lambda: os.kill(os.getpid(), signal.SIGINT)  # held until publish returns
    before = set(fake.images_by_fp)
    with pytest.raises(KeyboardInterrupt):
        _build(fake, config, script)
    published = fake.called("publish")
    assert len(published) == 1
    assert set(fake.images_by_fp) == before  # the unnamed new image was removed again
    assert fake.instances_by_name == {} and not fake.image_exists("coi-test-x")


