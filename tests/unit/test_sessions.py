"""The pure logic of a session: names and slots, mounts, environment, limits, the
container's spec and record. Table-driven; nothing here talks to Incus."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from coi import naming
from coi.config import Mount
from coi.errors import ConflictError, CoiError, UsageError
from coi.sessions import commands, spec, tmux

pytestmark = pytest.mark.unit


# ---- names and slots --------------------------------------------------------------

@pytest.mark.parametrize("env, prefix", [({}, "coi-"), ({"COI_CONTAINER_PREFIX": "coi-test-"}, "coi-test-"),
                                         ({"COI_CONTAINER_PREFIX": ""}, "coi-")])
def test_container_prefix(env, prefix):
    assert naming.container_prefix(env) == prefix


@pytest.mark.parametrize("workspace, slot", [("/home/u/p", 1), ("/srv/x y", 12), ("/", 3)])
def test_container_names_are_the_workspace_hash_and_slot(workspace, slot):
    name = naming.container_name(workspace, slot, prefix="coi-")
    assert name == f"coi-{hashlib.sha256(workspace.encode()).hexdigest()[:8]}-{slot}"
    assert naming.slot_of(name) == slot and naming.tmux_session(name) == f"coi-{name}"


@pytest.mark.parametrize("name, slot", [("coi-abc-1", 1), ("coi-abc-10", 10), ("coi-abc", None), ("x-", None)])
def test_slot_of(name, slot):
    assert naming.slot_of(name) == slot


@pytest.mark.parametrize("used, wanted, max_slots, slot", [
    (set(), 0, 10, 1), ({1, 2}, 0, 10, 3), ({1, 3}, 0, 10, 2), (set(), 4, 10, 4), ({4}, 4, 10, 5),
    ({4, 5}, 4, 10, 6), ({1}, 0, 2, 2),
])
def test_choose_slot(used, wanted, max_slots, slot):
    assert spec.choose_slot(used, wanted=wanted, max_slots=max_slots) == slot


@pytest.mark.parametrize("used, wanted, message", [({1, 2}, 0, "all 2 slots"), ({2}, 2, "from 2")])
def test_no_free_slot_is_a_conflict(used, wanted, message):
    with pytest.raises(ConflictError, match=message):
        spec.choose_slot(used, wanted=wanted, max_slots=2)


# ---- environment --------------------------------------------------------------------

@pytest.mark.parametrize("items, env", [
    ([], {}), (["A=1"], {"A": "1"}), (["A="], {"A": ""}), (["A=x=y"], {"A": "x=y"}),
    (["A=1", "A=2"], {"A": "2"}), (["_X9=$(id)`x`\n'q'"], {"_X9": "$(id)`x`\n'q'"}),
])
def test_parse_env(items, env):
    assert spec.parse_env(items) == env


@pytest.mark.parametrize("item, message", [("A", "not KEY=VALUE"), ("=1", "not KEY=VALUE"),
                                           ("9A=1", "not a valid"), ("A-B=1", "not a valid"),
                                           ("A B=1", "not a valid")])
def test_bad_env_items_are_refused(item, message):
    with pytest.raises(UsageError, match=message):
        spec.parse_env([item])


@pytest.mark.parametrize("term, kept", [("xterm-256color", "xterm-256color"), ("tmux-256color", "tmux-256color"),
                                        ("alacritty", "xterm-256color"), (None, "xterm-256color"),
                                        ("", "xterm-256color")])
def test_terminal_type(term, kept):
    assert spec.terminal_type(term) == kept


def test_the_agent_environment_holds_only_what_is_named():
    env = spec.agent_environment(term="weird", extra={"API_KEY": "k", "PATH": "/x"})
    assert env["HOME"] == spec.CODE_HOME and env["TERM"] == "xterm-256color" and env["IS_SANDBOX"] == "1"
    assert env["API_KEY"] == "k" and env["PATH"] == "/x"  # named values win
    assert set(env) == {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "TERM", "IS_SANDBOX", "API_KEY"}


@pytest.mark.parametrize("value", ["plain", "", "it's", 'a "b"', "$(touch /tmp/x)", "`id`", "a\nb", "\\n", "é ☃"])
def test_the_env_file_gives_values_back_byte_for_byte(value):
    text = commands.env_file_text({"V": value}).decode()
    out = subprocess.run(["sh", "-c", f"{text}printf %s \"$V\""], capture_output=True, text=True)
    assert out.stdout == value


# ---- mounts --------------------------------------------------------------------------

@pytest.mark.parametrize("given, host, container", [
    ("/data:/data", "/data", "/data"), ("rel/dir:/x", "/cwd/rel/dir", "/x"), ("/a:b:/c", "/a:b", "/c"),
])
def test_parse_mount(given, host, container):
    assert spec.parse_mount(given, cwd=Path("/cwd")) == Mount(Path(host), container)


def test_parse_mount_expands_the_home():
    assert spec.parse_mount("~/n:/n", cwd=Path("/cwd")).host == Path(os.path.expanduser("~/n"))


@pytest.mark.parametrize("given", ["/data", ":/x", "/x:", "nothing"])
def test_bad_mounts_are_refused(given):
    with pytest.raises(UsageError, match="HOST:CONTAINER"):
        spec.parse_mount(given, cwd=Path("/"))


@pytest.mark.parametrize("targets, storage, message", [
    (["/data"], False, None), (["/data", "/other"], False, None), (["/storage"], False, None),
    (["rel"], False, "not an absolute"), (["/a/../b"], False, "'..'"), (["/workspace"], False, "is /workspace"),
    (["/workspace/sub"], False, "overlaps /workspace"), (["/"], False, "overlaps /workspace"),
    (["/data", "/data"], False, "is /data"), (["/data", "/data/x"], False, "overlaps /data"),
    (["/storage"], True, "is /storage"),
])
def test_check_mounts(targets, storage, message):
    mounts = [Mount(Path("/h"), t) for t in targets]
    if message is None:
        spec.check_mounts(mounts, storage=storage)
    else:
        with pytest.raises(UsageError, match=message):
            spec.check_mounts(mounts, storage=storage)


def test_a_mount_source_swapped_for_a_link_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    inst = {"name": "c", "devices": {"m": {"type": "disk", "source": str(real), "path": "/m"},
                                     "root": {"type": "disk", "pool": "coi", "path": "/"}}}
    spec.check_mount_sources(inst)
    real.rmdir()
    with pytest.raises(CoiError, match="missing"):
        spec.check_mount_sources(inst)
    (tmp_path / "elsewhere").mkdir()
    real.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CoiError, match="a link"):
        spec.check_mount_sources(inst)


# ---- limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu, memory, processes, config", [
    ("", "", 0, {}), ("2", "", 0, {"limits.cpu": "2"}), ("0-1", "", 0, {"limits.cpu": "0-1"}),
    ("0,2", "", 0, {"limits.cpu": "0,2"}), ("", "4GiB", 0, {"limits.memory": "4GiB"}),
    ("", "50%", 0, {"limits.memory": "50%"}), ("", "512MB", 100, {"limits.memory": "512MB", "limits.processes": "100"}),
])
def test_limits_config(cpu, memory, processes, config):
    assert spec.limits_config(cpu=cpu, memory=memory, processes=processes, host_cpus=4) == config


@pytest.mark.parametrize("cpu, memory, processes, message", [
    ("0", "", 0, "limits.cpu"), ("two", "", 0, "limits.cpu"), ("8", "", 0, "more than"), ("", "lots", 0, "memory"),
    ("", "0GiB", 0, "memory"), ("", "4 GiB", 0, "memory"), ("", "", -1, "processes"),
])
def test_bad_limits_are_refused(cpu, memory, processes, message):
    with pytest.raises(UsageError, match=message):
        spec.limits_config(cpu=cpu, memory=memory, processes=processes, host_cpus=4)


# ---- the container's spec and record ---------------------------------------------------------

def _spec(tmp_path, **kw):
    args = dict(image="coi", workspace=tmp_path, slot=2, session_id="sid", persistent=False, tool="claude",
                mounts=[], storage=None, host_uid=1001, host_gid=1002, code_uid=1000, shift=False,
                base_config=spec.CONTAINER_CONFIG)
    args.update(kw)
    return spec.container_spec(**args)


@pytest.mark.parametrize("shift, idmap, disk_shift", [
    (False, "uid 1001 1000\ngid 1002 1000", None), (True, None, "true")])
def test_workspace_ownership_is_kept_either_way(tmp_path, shift, idmap, disk_shift):
    config, devices = _spec(tmp_path, shift=shift)
    assert config.get("raw.idmap") == idmap
    assert devices["workspace"].get("shift") == disk_shift and devices["workspace"]["path"] == spec.WORKSPACE


def test_the_spec_records_the_session_and_resolves_links(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "ln").symlink_to(tmp_path / "real")
    config, devices = _spec(tmp_path, persistent=True, profile="rust", storage=tmp_path / "ln",
                            mounts=[Mount(tmp_path / "ln", "/m")])
    assert {k: config[k] for k in ("user.coi.slot", "user.coi.session_id", "user.coi.persistent", "user.coi.tool",
                                   "user.coi.image", "user.coi.profile")} == {
        "user.coi.slot": "2", "user.coi.session_id": "sid", "user.coi.persistent": "true",
        "user.coi.tool": "claude", "user.coi.image": "coi", "user.coi.profile": "rust"}
    assert config["boot.autostart"] == "false" and config["security.nesting"] == "true"
    assert devices["mount1"]["source"] == devices["storage"]["source"] == str(tmp_path / "real")
    assert devices["storage"]["path"] == spec.STORAGE


def test_a_branch_session_mounts_its_copy_and_the_repository_objects_read_only(tmp_path):
    from coi.branches.copies import CONTAINER_OBJECTS, Branch

    (tmp_path / "ws" / ".git" / "objects").mkdir(parents=True)
    branch = Branch(name="brave-otter", workspace=tmp_path / "ws", base="0" * 40, created_at="",
                    root=tmp_path / "state" / "branches" / "h", git_dir=tmp_path / "ws" / ".git")
    config, devices = _spec(tmp_path / "ws", branch=branch)
    assert config["user.coi.branch"] == "brave-otter"
    assert config["user.coi.workspace"] == str(tmp_path / "ws")  # slots and resume stay the workspace's
    assert devices["workspace"]["source"] == str(tmp_path / "state" / "branches" / "h" / "brave-otter")
    assert devices["repo-objects"] == {"type": "disk", "source": str(tmp_path / "ws" / ".git" / "objects"),
                                       "path": CONTAINER_OBJECTS, "readonly": "true"}
    _, plain = _spec(tmp_path / "ws")
    assert "repo-objects" not in plain and "user.coi.branch" not in _spec(tmp_path / "ws")[0]


@pytest.mark.parametrize("instance, prefix, coi", [
    ({"name": "coi-a-1", "config": {"user.coi.workspace": "/w"}}, "coi-", True),
    ({"name": "coi-a-1", "config": {}}, "coi-", False),
    ({"name": "mine-1", "config": {"user.coi.workspace": "/w"}}, "coi-", False),
    ({"name": "coi-test-a-1", "config": {"user.coi.workspace": "/w"}}, "coi-test-", True),
])
def test_is_coi(instance, prefix, coi):
    assert spec.is_coi(instance, prefix) is coi


@pytest.mark.parametrize("status, power, stopped", [
    ("Stopped", None, True), ("Stopped", "STOPPED", True), ("Stopped", "RUNNING", False), ("Running", None, False)])
def test_is_stopped(status, power, stopped):
    config = {} if power is None else {"volatile.last_state.power": power}
    assert spec.is_stopped({"status": status, "config": config}) is stopped


def test_a_record_as_coi_list_shows_it():
    inst = {"name": "coi-a-2", "status": "Running", "created_at": "t",
            "config": {"user.coi.workspace": "/w", "user.coi.slot": "2", "user.coi.persistent": "true",
                       "user.coi.image": "coi", "user.coi.session_id": "s", "user.coi.tool": "claude",
                       "limits.cpu": "2"},
            "state": {"network": {"lo": {"addresses": [{"family": "inet", "address": "127.0.0.1"}]},
                                  "eth0": {"addresses": [{"family": "inet6", "address": "fe80::1"},
                                                         {"family": "inet", "address": "10.0.0.5"}]}}}}
    info = spec.to_info(inst)
    assert (info.slot, info.persistent, info.ipv4, info.limits) == (2, True, ["10.0.0.5"], {"cpu": "2"})
    assert info.to_json()["ipv4"] == "10.0.0.5"
    assert spec.to_info({**inst, "status": "Stopped"}).ipv4 == []


# ---- command lines -------------------------------------------------------------------------

@pytest.mark.parametrize("uid, gid, ids", [(1000, None, ["--reuid=1000", "--regid=1000"]),
                                           (1000, 27, ["--reuid=1000", "--regid=27"])])
def test_as_user_keeps_the_groups(uid, gid, ids):
    assert commands.as_user(["id"], uid=uid, gid=gid) == ["setpriv", *ids, "--init-groups", "--", "id"]


@pytest.mark.parametrize("agent, argv", [
    (None, ["bash", "-l"]),
    (["claude", "--session-id", "s"], ["bash", "-l", "-c", "claude --session-id s; exec bash -l"]),
    (["sh", "-c", "a; b"], ["bash", "-l", "-c", "sh -c 'a; b'; exec bash -l"]),
])
def test_agent_shell_command(agent, argv):
    assert tmux.agent_shell_command(agent) == argv


@pytest.mark.parametrize("name, slot", [("coi-1a2b3c4d-3", "3"), ("coi-1a2b3c4d-x", None), ("my-box", None),
                                        ("coi-zzzzzzzz-1", None), ("other-1a2b3c4d-2", None)])
def test_a_launched_container_is_coi_s_with_the_slot_its_name_gives(name, slot):
    config = spec.launched_config(name, image="coi", ephemeral=False, prefix="coi-")
    assert config["user.coi.launched"] == "true" and config["user.coi.persistent"] == "true"
    assert config.get("user.coi.slot") == slot
    assert spec.is_coi({"name": name, "config": config}, "coi-") is name.startswith("coi-")
    assert spec.is_launched({"name": name, "config": config})
    assert spec.launched_config(name, image="coi", ephemeral=True, prefix="coi-")["user.coi.persistent"] == "false"


def test_a_container_coi_did_not_make_is_never_coi_s():
    assert not spec.is_coi({"name": "coi-1a2b3c4d-1", "config": {"user.other": "x"}}, "coi-")
    assert not spec.is_launched({"name": "coi-1a2b3c4d-1", "config": {"user.coi.launched": "no"}})
