"""Images against the real daemon: custom builds, failures and Ctrl+C clean-up,
``--force``, the image commands, the DNS self-repair, and the full coi image
(every tool as user code, power commands, Docker inside the container).

CLI commands run as the normal test user (``coi_user``), the way people run
them; every image a test makes has a ``coi-test-`` alias and is deleted by the
test (and, failing that, by the session finaliser in conftest).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from coi.errors import CoiError, NotFoundError
from coi.images import CONTAINER_CONFIG
from coi.wait import wait_for

pytestmark = pytest.mark.integration

BASE = "coi-base-debian-bookworm"
WARM_BUILD_LIMIT = 30.0  # seconds: a custom build on a cached base


# ---- helpers ------------------------------------------------------------------------


@pytest.fixture
def alias(incus):
    """A fresh ``coi-test-`` alias prefix; every image named with it is deleted afterwards."""
    name = f"coi-test-img-{uuid.uuid4().hex[:8]}"
    yield name
    _delete_images(incus, name)


def _delete_images(incus, prefix: str) -> None:
    for image in incus.images():
        if any(a["name"].startswith(prefix) for a in image.get("aliases") or []):
            try:
                incus.delete_image(image["fingerprint"])
            except NotFoundError:
                pass


@pytest.fixture
def launched(incus):
    """Containers a test launches; all force-deleted afterwards."""
    names: list[str] = []

    def launch(image: str, *, config: dict[str, str] | None = None) -> str:
        name = f"coi-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        incus.create_instance(name, image=image, profiles=["coi"], config=config or {}, start=True)
        return name

    yield launch
    for name in names:
        subprocess.run(["incus", "delete", "--force", name], capture_output=True)


def _script(workspace: Path, text: str, name: str = "setup.sh", mode: int = 0o644) -> Path:
    path = workspace / name
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, workspace.stat().st_uid, workspace.stat().st_gid)
    return path


def _builder(output: str) -> str:
    match = re.search(r"Launch builder (coi-test-build-[0-9a-f]+)", output)
    assert match, output
    return match[1]


def _fingerprint(incus, alias: str) -> str:
    return incus.image_alias(alias)["target"]


def _log_of(coi_user, alias: str) -> Path:
    return coi_user.home / ".coi" / "logs" / f"build-{alias}.log"


def _wait_network(incus, name: str, timeout: float = 60) -> None:
    wait_for(lambda: incus.exec(name, ["getent", "hosts", "deb.debian.org"]).exit_code == 0,
             timeout=timeout, what=f"the network of {name}")


def _booted(incus, name: str, timeout: float = 60) -> None:
    """systemd finished booting (before that, there is no bus to ask for a poweroff)."""
    def state() -> bool:
        try:
            out = incus.exec(name, ["systemctl", "is-system-running"]).stdout.strip()
        except CoiError:
            return False
        return out in ("running", "degraded")

    wait_for(state, timeout=timeout, what=f"{name} to finish booting")


def _as_code(incus, name: str, command: str):
    """``command`` in a login shell of user code (code's own PATH, groups and HOME)."""
    return incus.exec(name, ["runuser", "-l", "code", "-c", command])


# ---- custom builds ------------------------------------------------------------------


def test_custom_build_from_a_one_line_script(coi_user, incus, base_image, workspace, alias, launched):
    script = _script(workspace, "echo hello-from-script | tee /etc/coi-test-marker\n")
    started = time.monotonic()
    proc = coi_user.run(["build", "custom", alias, "--script", str(script), "--base", base_image])
    seconds = time.monotonic() - started
    print(f"warm custom build: {seconds:.1f}s")
    assert proc.returncode == 0, proc.stderr
    assert seconds < WARM_BUILD_LIMIT
    err = proc.stderr
    assert "[1/4] Launch builder" in err and "elapsed" in err
    assert "hello-from-script" not in err  # a step's own output goes to the log (--verbose shows it)
    assert f"Image {alias} ready: fingerprint" in err
    assert not incus.exists(_builder(err))

    log = _log_of(coi_user, alias)
    assert "hello-from-script" in log.read_text()
    assert log.stat().st_uid == coi_user.uid

    props = incus.image_by_alias(alias)["properties"]
    assert props["coi.kind"] == "custom"
    assert props["coi.base"] == base_image
    assert re.fullmatch(r"[0-9a-f]{16}", props["coi.script_hash"])
    assert props["coi.version"] and props["coi.built_at"]

    started = time.monotonic()
    name = launched(alias)
    print(f"first launch of the new image: {time.monotonic() - started:.2f}s")  # unpacked by the build
    assert incus.exec(name, ["cat", "/etc/coi-test-marker"]).stdout == "hello-from-script\n"
    assert incus.exec(name, ["cat", "/etc/machine-id"]).stdout.strip() != ""  # a fresh id per container


def test_failing_script_names_step_and_log_and_leaves_nothing(coi_user, incus, base_image, workspace, alias):
    script = _script(workspace, "echo about-to-fail\nexit 3\n", name="broken.sh")
    proc = coi_user.run(["build", "custom", alias, "--script", str(script), "--base", base_image])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    log = _log_of(coi_user, alias)
    assert "failed at step 'Run broken.sh as root'" in proc.stderr
    assert "exit code 3" in proc.stderr and str(log) in proc.stderr
    assert "about-to-fail" in log.read_text()
    assert "    | about-to-fail" in proc.stderr  # the end of the log, shown with the failure
    assert not incus.exists(_builder(proc.stderr))
    assert not incus.image_exists(alias)
    assert coi_user.run(["image", "exists", alias]).returncode == 1


def test_missing_or_unreadable_script_is_refused_before_any_container(coi_user, incus, workspace, alias):
    proc = coi_user.run(["build", "custom", alias, "--script", str(workspace / "nope.sh"), "--base", BASE])
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    secret = _script(workspace, "echo secret\n", name="secret.sh", mode=0o600)
    os.chown(secret, 0, 0)
    proc = coi_user.run(["build", "custom", alias, "--script", str(secret), "--base", BASE])
    assert proc.returncode == 1
    assert "cannot read build script" in proc.stderr
    assert "Launch builder" not in proc.stderr
    assert not _log_of(coi_user, alias).exists()  # nothing started: not even a log
    assert not incus.image_exists(alias)


def test_force_replaces_only_after_a_successful_publish(coi_user, incus, base_image, workspace, alias,
                                                        launched):
    good = _script(workspace, "echo v1 > /etc/coi-test-version\n", name="v1.sh")
    assert coi_user.run(["build", "custom", alias, "--script", str(good), "--base", base_image]).returncode == 0
    first = _fingerprint(incus, alias)

    proc = coi_user.run(["build", "custom", alias, "--script", str(good), "--base", base_image])
    assert proc.returncode == 1 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert "Launch builder" not in proc.stderr

    bad = _script(workspace, "echo v2 > /etc/coi-test-version\nfalse\n", name="v2-broken.sh")
    proc = coi_user.run(["build", "custom", alias, "--script", str(bad), "--base", base_image, "--force"])
    assert proc.returncode == 1
    assert _fingerprint(incus, alias) == first  # the old image is untouched...
    name = launched(alias)  # ...and still usable
    assert incus.exec(name, ["cat", "/etc/coi-test-version"]).stdout == "v1\n"

    newer = _script(workspace, "echo v2 > /etc/coi-test-version\n", name="v2.sh")
    proc = coi_user.run(["build", "custom", alias, "--script", str(newer), "--base", base_image, "--force"])
    assert proc.returncode == 0, proc.stderr
    second = _fingerprint(incus, alias)
    assert second != first
    with pytest.raises(NotFoundError):
        incus.image(first)  # the replaced image is gone
    assert incus.exec(launched(alias), ["cat", "/etc/coi-test-version"]).stdout == "v2\n"


def test_ctrl_c_during_a_build_cleans_up(coi_user, incus, base_image, workspace, alias):
    script = _script(workspace, "echo step-started\nsleep 300\n", name="slow.sh")
    argv = coi_user.argv(["coi", "build", "custom", alias, "--script", str(script), "--base", base_image,
                          "--verbose"])  # the step's own output, streamed
    proc = subprocess.Popen(argv, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, like a terminal's job
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "step-started" in line:
                break
        builder = _builder("".join(seen))
        assert incus.exists(builder)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C sends to the foreground job
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Interrupted: removing builder" in rest
    assert not incus.exists(builder)
    assert not incus.image_exists(alias)


# ---- image commands -------------------------------------------------------------------


def test_image_publish_list_exists_delete(coi_user, incus, base_image, alias, container_name):
    incus.create_instance(container_name, image=base_image, profiles=["coi"], start=True)
    proc = coi_user.run(["image", "publish", container_name, alias])
    assert proc.returncode == 1 and "stop it first" in proc.stderr
    incus.stop(container_name, force=True)

    proc = coi_user.run(["image", "publish", container_name, alias, "--description", "made by a test"])
    assert proc.returncode == 0, proc.stderr
    assert coi_user.run(["image", "exists", alias]).returncode == 0
    proc = coi_user.run(["image", "publish", container_name, alias])
    assert proc.returncode == 1 and "already exists" in proc.stderr

    rows = json.loads(coi_user.run(["image", "list", "--format", "json"]).stdout)
    mine, = [r for r in rows if r["alias"] == alias]
    assert mine["coi.kind"] == "published" and mine["description"] == "made by a test"
    assert mine["fingerprint"] == _fingerprint(incus, alias) and mine["size"] > 0 and mine["created"]
    assert all("coi.kind" in r for r in rows)  # coi-built images only without --all
    every = json.loads(coi_user.run(["image", "list", "--all", "--format", "json"]).stdout)
    assert len(every) >= len(rows)

    table = coi_user.run(["image", "list", "--prefix", alias]).stdout
    assert table.splitlines()[0] == "COI Images:" and table.splitlines()[1].split()[:3] == ["ALIAS", "FINGERPRINT", "SIZE"]
    assert alias in table and len(table.splitlines()) == 3
    assert coi_user.run(["images", "--prefix", alias]).stdout == table  # the alias of coi image list
    every = coi_user.run(["image", "list", "--all"]).stdout
    assert every.startswith("COI Images:\n") and "\nAvailable Images:\n" in every
    assert coi_user.run(["image", "list", "--prefix", f"{alias}-nothing"]).stdout.startswith("No images found")

    proc = coi_user.run(["image", "list", "--format", "yaml"])
    assert proc.returncode == 2 and "invalid choice: 'yaml'" in proc.stderr  # a usage error, as everywhere

    assert coi_user.run(["image", "delete", alias]).returncode == 0
    assert coi_user.run(["image", "exists", alias]).returncode == 1
    proc = coi_user.run(["image", "delete", alias])
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def _tiny_image(incus, tmp_path: Path, alias: str, content: str) -> str:
    """Import a minimal image (a single file) under ``alias``; returns its fingerprint."""
    def tar(path: Path, files: dict[str, str]) -> Path:
        with tarfile.open(path, "w") as t:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(time.time())
                t.addfile(info, io.BytesIO(data))
        return path

    # metadata.yaml needs a properties map: Incus 6.0.4 panics when it adds the
    # X-Incus-properties of the upload to an image that has none.
    meta = tar(tmp_path / f"{alias}-meta.tar",
               {"metadata.yaml": f"architecture: x86_64\ncreation_date: {int(time.time())}\n"
                                 f"properties:\n  description: coi test image {alias}\n"})
    rootfs = tar(tmp_path / f"{alias}-rootfs.tar", {"content": content})
    fingerprint = incus.import_split_image(meta, rootfs, properties={"coi.kind": "custom"})
    incus.create_alias(alias, fingerprint)
    return fingerprint


def test_image_cleanup_keeps_the_newest(coi_user, incus, alias, tmp_path):
    prefix = f"{alias}-v"
    made = [_tiny_image(incus, tmp_path, f"{prefix}{i}", f"version {i} {uuid.uuid4()}") for i in (1, 2, 3)]
    other = _tiny_image(incus, tmp_path, f"{alias}-other", "unrelated")

    proc = coi_user.run(["image", "cleanup", prefix, "--keep", "0"])
    assert proc.returncode == 2 and "at least 1" in proc.stderr
    assert all(incus.image_exists(f"{prefix}{i}") for i in (1, 2, 3))

    proc = coi_user.run(["image", "cleanup", prefix, "--keep", "2"])
    assert proc.returncode == 0, proc.stderr
    assert f"Deleted image {prefix}1" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "Cleanup complete: 1 image(s) removed, 2 kept"
    assert not incus.image_exists(f"{prefix}1")
    with pytest.raises(NotFoundError):
        incus.image(made[0])
    assert incus.image_exists(f"{prefix}2") and incus.image_exists(f"{prefix}3")
    assert incus.image_alias(f"{alias}-other")["target"] == other


# ---- DNS self-repair -------------------------------------------------------------------


@pytest.fixture
def broken_dns_base(incus, base_image, alias, launched):
    """A base image whose resolver is a dead loopback stub (systemd-resolved disabled)."""
    name = launched(base_image)
    _booted(incus, name)
    result = incus.exec(name, ["sh", "-c", "systemctl disable systemd-resolved.service && "
                               "rm -f /etc/resolv.conf && echo 'nameserver 127.0.0.53' > /etc/resolv.conf"])
    assert result.exit_code == 0, result.stderr
    incus.stop(name, force=True)
    fingerprint = incus.publish(name)
    incus.create_alias(f"{alias}-brokendns", fingerprint)
    return f"{alias}-brokendns"


def test_dns_repair_of_a_dead_stub_resolver(coi_user, incus, broken_dns_base, workspace, alias, launched):
    network_before = incus.network("coibr0")["config"]
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    gateway = network_before["ipv4.address"].split("/")[0]

    script = _script(workspace, "getent hosts deb.debian.org && echo names-resolve\n")
    fixed = f"{alias}-fixed"
    proc = coi_user.run(["build", "custom", fixed, "--script", str(script), "--base", broken_dns_base])
    assert proc.returncode == 0, proc.stderr
    assert f"bridge's resolver {gateway} (inside the image only)" in proc.stderr
    assert "DNS repaired" in proc.stderr and "names-resolve" in _log_of(coi_user, fixed).read_text()

    name = launched(fixed)
    assert incus.exec(name, ["cat", "/etc/resolv.conf"]).stdout == f"nameserver {gateway}\n"
    _wait_network(incus, name)  # names resolve in containers made from the image too

    assert incus.network("coibr0")["config"] == network_before  # host and Incus untouched
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv


# ---- the full coi image ----------------------------------------------------------------

TOOLS = {
    "tmux": "tmux -V", "bash": "bash --version", "git": "git --version", "curl": "curl --version",
    "wget": "wget --version", "jq": "jq --version", "unzip": "unzip -v", "ssh": "ssh -V",
    "gcc": "gcc --version", "make": "make --version", "python3": "python3 --version",
    "pip": "pip --version", "venv": "python3 -m venv --help", "node": "node --version",
    "npm": "npm --version", "gh": "gh --version", "docker": "docker --version",
    "claude": "claude --version",
}


@pytest.fixture
def coi_box(incus, coi_image, launched):
    """A running, booted container of the coi image, configured the way coi launches them."""
    name = launched(coi_image, config=CONTAINER_CONFIG)
    _booted(incus, name)
    return name


def test_coi_image_records_what_was_built(coi_user, incus, coi_image):
    props = incus.image_by_alias(coi_image)["properties"]
    assert props["coi.kind"] == "coi" and props["coi.tools"] == "claude"
    assert props["coi.base"].startswith("bootstrap:debian/")
    for key in ("coi.version", "coi.script_hash", "coi.built_at", "coi.inputs"):
        assert props[key], key
    rows = json.loads(coi_user.run(["image", "list", "--format", "json"]).stdout)
    row, = [r for r in rows if r["alias"] == coi_image]
    assert row["coi.inputs"] == props["coi.inputs"] and row["coi.version"] == props["coi.version"]


def test_coi_build_refuses_to_replace_without_force(coi_user, incus, coi_image):
    before = _fingerprint(incus, coi_image)
    proc = coi_user.run(["build"])
    assert proc.returncode == 1
    assert "image coi already exists" in proc.stderr and "coi build --force" in proc.stderr
    assert "Launch builder" not in proc.stderr
    proc = coi_user.run(["build", "--force", "--tools", "claude,vim"])
    assert proc.returncode == 2 and "unknown agent tool 'vim'" in proc.stderr
    assert _fingerprint(incus, coi_image) == before


def test_custom_build_on_the_coi_image_by_default(coi_user, incus, coi_image, workspace, alias, launched):
    script = _script(workspace, "#!/bin/sh\nset -e\nrunuser -u code -- touch /home/code/from-custom\n")
    started = time.monotonic()
    proc = coi_user.run(["build", "custom", alias, "--script", str(script)])
    print(f"custom build on the coi image: {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, proc.stderr
    assert incus.image_by_alias(alias)["properties"]["coi.base"] == coi_image
    name = launched(alias, config=CONTAINER_CONFIG)
    assert incus.exec(name, ["stat", "-c", "%U", "/home/code/from-custom"]).stdout == "code\n"


def test_every_tool_runs_as_code(incus, coi_box):
    failures = {}
    for tool, command in TOOLS.items():
        result = _as_code(incus, coi_box, command)
        if result.exit_code != 0:
            failures[tool] = (result.exit_code, result.stdout[-300:], result.stderr[-300:])
    assert failures == {}
    assert re.match(r"\d+\.\d+\.\d+", _as_code(incus, coi_box, "claude --version").stdout)
    assert incus.exec(coi_box, ["test", "-s", "/etc/ssl/certs/ca-certificates.crt"]).exit_code == 0


def test_user_code_and_workspace(incus, coi_box):
    assert _as_code(incus, coi_box, "id -u; id -g; echo $HOME").stdout.split() == ["1000", "1000", "/home/code"]
    groups = _as_code(incus, coi_box, "id -nG").stdout.split()
    assert {"code", "sudo", "docker"} <= set(groups)
    assert _as_code(incus, coi_box, "sudo -n true").exit_code == 0
    assert incus.exec(coi_box, ["stat", "-c", "%U:%G", "/workspace"]).stdout.strip() == "code:code"
    assert incus.exec(coi_box, ["readlink", "/proc/1/exe"]).stdout.strip().endswith("systemd")


def _status(incus, name: str) -> str:
    return incus.instance(name)["status"]


@pytest.mark.parametrize("command", ["sudo poweroff", "sudo shutdown 0", "poweroff"])
def test_power_off_from_inside_as_code(incus, coi_image, launched, command):
    name = launched(coi_image, config=CONTAINER_CONFIG)
    _booted(incus, name)
    try:
        result = _as_code(incus, name, command)
        output = result.stdout + result.stderr
    except CoiError as exc:  # the container may go away under the exec
        output = exc.message
    assert "Access denied" not in output and "Permission denied" not in output, output
    wait_for(lambda: _status(incus, name) == "Stopped", timeout=60, what=f"{name} to stop after {command!r}")


def test_reboot_from_inside_as_code(incus, coi_image, launched):
    name = launched(coi_image, config=CONTAINER_CONFIG)
    _booted(incus, name)
    assert incus.exec(name, ["touch", "/run/coi-test-before-reboot"]).exit_code == 0
    try:
        result = _as_code(incus, name, "sudo reboot")
        output = result.stdout + result.stderr
    except CoiError as exc:
        output = exc.message
    assert "Access denied" not in output and "Permission denied" not in output, output

    def rebooted() -> bool:
        try:
            return (_status(incus, name) == "Running"
                    and incus.exec(name, ["test", "-e", "/run/coi-test-before-reboot"]).exit_code == 1)
        except CoiError:
            return False

    wait_for(rebooted, timeout=90, what=f"{name} to come back after reboot")


def test_docker_runs_a_container_inside_a_coi_container(incus, coi_box):
    _wait_network(incus, coi_box)
    # A tiny image from a local tarball: busybox from the Debian mirror, nothing from a registry.
    result = incus.exec(coi_box, ["sh", "-c", "apt-get update -q && apt-get install -y -q busybox-static"],
                        env={"DEBIAN_FRONTEND": "noninteractive"})
    assert result.exit_code == 0, result.stdout[-500:] + result.stderr[-500:]
    wait_for(lambda: _as_code(incus, coi_box, "docker info").exit_code == 0, timeout=60,
             what="the Docker daemon")
    result = _as_code(incus, coi_box,
                      "set -e; mkdir -p tiny/bin; cp /bin/busybox tiny/bin/; "
                      "tar -C tiny -c . | docker import - coi-tiny:1; "
                      "docker run --rm coi-tiny:1 /bin/busybox echo hello-from-docker")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "hello-from-docker" in result.stdout
