"""A hostile project and a hostile agent against coi, on the real daemon, as a normal user.

The project plays through files in the workspace (its .coi.toml, a planted
Python package); the agent through what it does as root in its container,
planted here with ``coi run`` / ``coi container exec`` the way an agent would.
Every test asserts on the host: nothing ran, nothing leaked, nothing was left.
Network rules are looked for in the backend coi picks here (``coi_backend``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from coi import network
from coi.wait import wait_for

from conftest import NET_PROBE, TEST_PREFIX
from netbackend import coi_backend, ruled_anywhere  # noqa: F401

pytestmark = pytest.mark.security


def _own(user, *paths: Path) -> None:
    for path in paths:
        os.chown(path, user.uid, user.gid)


def start(user, workspace, *args: str, env: dict[str, str] | None = None) -> str:
    return user.background(workspace, "--debug", *args, env=env)["container"]


def processes() -> dict[int, list[bytes]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
    return found


def watchers(name: str) -> list[int]:
    return [pid for pid, argv in processes().items() if b"coi.network.watcher" in argv and name.encode() in argv]


def workspace_containers(incus, workspace: Path) -> list[str]:
    return [i["name"] for i in incus.instances() if i["config"].get("user.coi.workspace") == str(workspace)]


@pytest.fixture
def marker():
    """A host path that planted code would create if it ever ran on the host."""
    path = Path(f"/tmp/{TEST_PREFIX}pwned-{uuid.uuid4().hex[:8]}")
    yield path
    path.unlink(missing_ok=True)


PAYLOAD = "import pathlib; pathlib.Path({path!r}).write_text('ran on the host')"


def test_a_python_package_in_the_workspace_never_runs_on_the_host(net_user, workspace, marker):
    """Planted by the project (a cloned repo) and by the agent (through /workspace):
    coi/__init__.py and coi/network/watcher.py where coi starts its watcher, PYTHONPATH
    pointing there."""
    payload = PAYLOAD.format(path=str(marker))
    package = workspace / "coi"
    (package / "network").mkdir(parents=True)
    for module in ("__init__.py", "network/__init__.py", "network/watcher.py", "network/helper.py"):
        (package / module).write_text(payload + "\n")
    _own(net_user, package, *package.rglob("*"))
    agent = ("mkdir -p /workspace/sub/coi/network && for m in __init__ network/__init__ network/watcher; do "
             f"printf '%s\\n' {shlex.quote(payload)} > /workspace/sub/coi/$m.py; done")
    assert net_user.run(["run", "--", "sh", "-c", agent], cwd=workspace).returncode == 0
    assert (workspace / "sub" / "coi" / "network" / "watcher.py").read_text() == payload + "\n"
    env = {"PYTHONPATH": str(workspace), "PYTHONSTARTUP": str(package / "__init__.py")}
    name = start(net_user, workspace, env=env)
    for cwd in (workspace, workspace / "sub"):
        proc = net_user.run(["run", "--", "true"], cwd=cwd, env=env)
        assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()
    pid, = watchers(name)
    argv = processes()[pid]
    assert b"-I" in argv  # isolated: no current directory, PYTHON* variables or user site on its path
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"PYTHON")], environ
    assert net_user.run(["kill", name]).returncode == 0


def test_a_state_directory_a_container_can_write_is_refused(session_user, workspace, incus):
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()
    try:
        config.write_text(original + f'\n[paths]\nsessions_dir = "{workspace}/.coi-state"\n')
        proc = session_user.run(["run", "--", "true"], cwd=workspace)
        assert proc.returncode == 1 and "state directory" in proc.stderr and "outside" in proc.stderr, proc.stderr
        assert workspace_containers(incus, workspace) == []
    finally:
        config.write_text(original)
    # From the workspace's own file it is not even read.
    (workspace / ".coi.toml").write_text(f'[paths]\nsessions_dir = "{workspace}/.coi-state"\n')
    _own(session_user, workspace / ".coi.toml")
    proc = session_user.run(["run", "--", "true"], cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert "ignored paths.sessions_dir" in proc.stderr
    assert not (workspace / ".coi-state").exists()
    state = session_user.home / ".coi"
    assert state.stat().st_mode & 0o777 == 0o700 and state.stat().st_uid == session_user.uid


def test_the_workspace_cannot_pull_host_secrets_into_the_agent(session_user, workspace):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    (workspace / ".coi.toml").write_text(
        '[tool]\nenv_passthrough = ["COI_TEST_SECRET", "HOME"]\n'
        '[[mounts.default]]\nhost = "$COI_TEST_SECRET"\ncontainer = "/leak"\n')
    _own(session_user, workspace / ".coi.toml")
    proc = session_user.run(["run", "--", "sh", "-c", "env; ls -d /leak/.. 2>/dev/null; mount | grep leak"],
                            cwd=workspace, env={"COI_TEST_SECRET": secret})
    assert secret not in proc.stdout and secret not in proc.stderr
    assert "ignored tool.env_passthrough" in proc.stderr
    assert not list(Path("/").glob(f"*{secret}*")) and not list(workspace.glob(f"*{secret}*"))


def test_the_workspace_cannot_pick_the_users_open_profile(session_user, workspace):
    config = session_user.home / ".config" / "coi" / "config.toml"
    original = config.read_text()
    try:
        config.write_text(original + '\n[profiles.wide]\nnetwork = { mode = "open" }\n')
        (workspace / ".coi.toml").write_text('[defaults]\nprofile = "wide"\n')
        _own(session_user, workspace / ".coi.toml")
        proc = session_user.run(["run", "--verbose", "--", "true"], cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        assert "Network: restricted" in proc.stderr and "profile wide" in proc.stderr, proc.stderr
        # The user's own choice of the same profile is honoured.
        (workspace / ".coi.toml").unlink()
        proc = session_user.run(["run", "--verbose", "--profile", "wide", "--", "true"], cwd=workspace)
        assert "Network: open" in proc.stderr, proc.stderr
    finally:
        config.write_text(original)


def test_session_containers_do_not_start_again_after_a_host_reboot(session_user, workspace, incus):
    name = start(session_user, workspace)
    assert incus.instance(name)["config"]["boot.autostart"] == "false"
    assert session_user.run(["kill", name]).returncode == 0


def test_a_mount_swapped_for_a_link_is_refused_at_the_next_start(session_user, workspace, incus):
    """The agent replaces an extra mount's directory inside the workspace with a link to a
    host directory; the persistent container must not start with the link's target."""
    data, secret = workspace / "data", session_user.home / f"{TEST_PREFIX}secret-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    secret.mkdir()
    (secret / "id_ed25519").write_text("PRIVATE KEY")
    _own(session_user, data, secret, secret / "id_ed25519")
    try:
        mount = ["--persistent", "--mount", f"{data}:/data"]
        name = start(session_user, workspace, *mount)
        swap = f"rm -rf /workspace/data && ln -s {secret} /workspace/data"
        assert session_user.run(["container", "exec", name, "--", "sh", "-c", swap]).returncode == 0
        assert data.is_symlink()
        assert session_user.run(["shutdown", name, "--timeout", "20"], cwd=workspace).returncode == 0
        proc = session_user.run(["shell", "--background", "--debug", *mount], cwd=workspace)
        assert proc.returncode == 1 and "is a link now" in proc.stderr, proc.stderr
        assert incus.instance(name)["status"] == "Stopped"
    finally:
        session_user.run(["kill", "--all", "--force"], cwd=workspace)
        subprocess.run(["rm", "-rf", str(secret)])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_run_leaves_nothing_behind(net_user, workspace, incus, sig, coi_backend):
    ready = workspace / "started"
    proc = subprocess.Popen(net_user.argv(["coi", "run", "--", "sh", "-c", "touch started; sleep 120"]),
                            cwd=workspace, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready.exists, timeout=60, what="the command to start")
        name, = workspace_containers(incus, workspace)
        assert name in coi_backend.containers() and watchers(name)
        coi = [pid for pid, argv in processes().items()
               if b"/usr/local/bin/coi" in argv and b"run" in argv and os.readlink(f"/proc/{pid}/cwd") == str(workspace)]
        assert coi, "the coi process"
        os.kill(coi[0], sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert workspace_containers(incus, workspace) == [], proc.stderr.read()
    assert name not in ruled_anywhere(incus)
    assert watchers(name) == []


def test_env_values_never_reach_a_host_process_list(net_user, workspace):
    token = f"tok-{uuid.uuid4().hex}"
    proc = subprocess.Popen(net_user.argv(["coi", "run", "-e", f"API_KEY={token}", "--", "sh", "-c",
                                           'printf %s "$API_KEY" > got; sleep 3']),
                            cwd=workspace, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    try:
        while proc.poll() is None:
            # The user's own command line holds the value (they typed it); incus exec's must not.
            seen += [argv for argv in processes().values()
                     if argv and os.path.basename(argv[0]) == b"incus" and any(token.encode() in a for a in argv)]
            time.sleep(0.05)  # sampling the process list while the command runs, not a synchronisation
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    assert seen == []
    assert (workspace / "got").read_text() == token


def test_the_hosts_own_addresses_are_refused_in_restricted_mode(net_user, workspace, net_lab):
    """An address the host has on another interface (a test address on a dummy link,
    standing in for its LAN or public address): local delivery, nothing leaves the host."""
    link, address = f"ctn{uuid.uuid4().hex[:6]}d", "198.51.100.200"
    # Both ends of a veth pair stay in the host's namespace (this kernel has no dummy links).
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", link + "p"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", link], check=True)
        for end in (link, link + "p"):
            subprocess.run(["ip", "link", "set", end, "up"], check=True)
        port = net_lab["lab"].http_on_host(address)
        items = json.dumps([["host", "http", f"http://{address}:{port}/"]])
        proc = net_user.run(["run", "--capture", "--", "python3", "-c", NET_PROBE, items], cwd=workspace)
        result = json.loads(json.loads(proc.stdout)["stdout"])["host"]
        assert not result["ok"] and result["seconds"] < 1.5, result
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def _dns_to_gateway(incus, name: str, gateway: str) -> dict:
    items = json.dumps([["dns", "dns", f"{gateway}:53"]])
    result = incus.exec(name, ["python3", "-c", NET_PROBE, items])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["dns"]


def test_a_container_started_behind_coi_has_no_network(net_user, workspace, incus, net_lab, coi_backend):
    """After a host reboot (or 'incus start') a coi container runs without its rules: the
    bridge's gate gives it no network at all, not a full one. Through coi it gets its rules."""
    name = start(net_user, workspace, "--persistent")
    assert _dns_to_gateway(incus, name, net_lab["gateway"])["ok"]  # opened by its rules
    assert net_user.run(["shutdown", name, "--timeout", "20"], cwd=workspace).returncode == 0
    assert name not in ruled_anywhere(incus)
    try:
        incus.start(name)  # as Incus would after a reboot: coi is not involved
        assert not _dns_to_gateway(incus, name, net_lab["gateway"])["ok"]
        incus.stop(name, force=True)
        assert net_user.run(["container", "start", name]).returncode == 0
        assert name in coi_backend.containers() and _dns_to_gateway(incus, name, net_lab["gateway"])["ok"]
    finally:
        net_user.run(["kill", name])
    assert name not in ruled_anywhere(incus)


def test_coi_container_launch_gets_rules_before_it_runs(net_user, incus, sandbox_image, container_name, net_lab,
                                                        coi_backend):
    assert net_user.run(["container", "launch", sandbox_image, container_name]).returncode == 0
    try:
        assert incus.instance(container_name)["config"]["boot.autostart"] == "false"
        assert container_name in coi_backend.containers()
        assert _dns_to_gateway(incus, container_name, net_lab["gateway"])["ok"]
        items = json.dumps([["private", "http", net_lab["private"].url]])
        probe = json.loads(incus.exec(container_name, ["python3", "-c", NET_PROBE, items]).stdout)
        assert not probe["private"]["ok"]
    finally:
        subprocess.run(["incus", "delete", "--force", container_name], capture_output=True)
        net_user.run(["clean", "--force"])
    assert container_name not in ruled_anywhere(incus)


def test_clean_keeps_the_rules_of_containers_in_other_projects(net_user, incus, sandbox_image, coi_backend):
    """Rules of a stopped container in another Incus project stay; those of a container
    deleted behind coi's back go (both put on with the backend coi picks here)."""
    import ipaddress

    from coi.incus import Incus

    tag = uuid.uuid4().hex[:6]
    project, other, ghost = f"{TEST_PREFIX}proj-{tag}", f"{TEST_PREFIX}other-{tag}", f"{TEST_PREFIX}ghost-{tag}"
    subnet = ipaddress.ip_interface(incus.network("coibr0")["config"]["ipv4.address"])
    policy = network.NetworkPolicy(mode="restricted")
    in_project = Incus.from_environment(project=project)
    backends = {other: network.Backends().named(coi_backend.name, client=in_project), ghost: coi_backend}
    try:
        subprocess.run(["incus", "project", "create", project, "-c", "features.images=false",
                        "-c", "features.profiles=false"], check=True, capture_output=True)
        subprocess.run(["incus", "init", sandbox_image, other, "--project", project, "--profile", "coi"],
                       check=True, capture_output=True)
        subprocess.run(["incus", "init", sandbox_image, ghost, "--profile", "coi"], check=True, capture_output=True)
        for i, name in enumerate((other, ghost)):
            att = network.Attachment(container=name, nic="eth0", bridge="coibr0", veth=f"coi{tag}{i:06d}",
                                     ipv4=str(subnet.network.network_address + 250 + i), gateway=str(subnet.ip),
                                     subnet=str(subnet.network))
            backends[name].apply(att, policy, [])
        subprocess.run(["incus", "delete", "--force", ghost], check=True, capture_output=True)  # behind coi's back
        assert {other, ghost} <= coi_backend.containers()
        assert net_user.run(["clean", "--force"]).returncode == 0
        assert other in coi_backend.containers() and ghost not in coi_backend.containers()
    finally:
        for name, backend in backends.items():
            backend.remove(name)
        in_project.close()
        subprocess.run(["incus", "delete", "--force", ghost], capture_output=True)
        subprocess.run(["incus", "delete", "--force", other, "--project", project], capture_output=True)
        subprocess.run(["incus", "project", "delete", project], capture_output=True)
