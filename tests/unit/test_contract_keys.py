"""Every key of the contract's configuration block is read and has an effect.

The key list is taken from the contract itself (../shared/spec/coi-cli.md);
each key, set to a value other than its default, must change what coi's own
code derives from the configuration: the session request and container, the
network policy, the host set-up call, the Incus client.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from coi import network
from coi.cli.context import Context
from coi.cli.ui import UI
from coi.config import SCHEMA
from fake_incus import FakeIncus

pytestmark = pytest.mark.unit
SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "coi-cli.md"


def contract_keys() -> set[str]:
    block = re.search(r"## Configuration keys\s+```toml\n(.*?)```", SPEC.read_text(), re.S).group(1)

    def walk(table, prefix=""):
        for key, value in table.items():
            path = f"{prefix}{key}"
            if path.startswith("profiles."):
                yield "profiles.*." + path.split(".", 2)[2] if path.count(".") > 1 else None
                if isinstance(value, dict):
                    yield from (f"profiles.*.{k}" for k in value)
                continue
            if isinstance(value, dict):
                yield from walk(value, path + ".")
            else:
                yield path
    return {k for k in walk(tomllib.loads(block)) if k}


@pytest.mark.skipif(not SPEC.exists(), reason="the contract (shared/spec) is not beside this checkout")
def test_every_contract_key_is_in_the_schema():
    known = {k.path for k in SCHEMA}
    assert contract_keys() - known == set()


def derived(tmp_path: Path, toml: str, monkeypatch) -> dict:
    """What coi derives from a user config file holding ``toml``."""
    home, ws = tmp_path / "home", tmp_path / "ws"
    os.makedirs(home / ".config" / "coi")
    os.makedirs(ws)
    (home / ".config" / "coi" / "config.toml").write_text(toml)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", ""), "PASSED": "yes"}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 1000)
    ctx = Context(ui=UI(quiet=True), workspace=ws, flag_values={})
    fake = FakeIncus()
    fake.server_info["environment"]["kernel_features"]["idmapped_mounts"] = "true"
    ctx.__dict__["incus"] = fake
    from coi.cli.commands import sessions as cmd
    from coi.sessions import container_spec

    req = cmd._request(ctx, slot=0, env=[], mount=[], storage="")
    config, devices = container_spec(
        image=req.image, workspace=req.workspace, slot=1, session_id="s", persistent=req.persistent,
        tool=req.tool.name, mounts=req.mounts, storage=req.storage, host_uid=req.host_uid,
        host_gid=req.host_gid, code_uid=req.code_uid, shift=req.shift, base_config=req.base_config)
    cfg = ctx.config
    captured = {}
    import coi.host
    monkeypatch.setattr(coi.host, "require_root", lambda: None)
    monkeypatch.setattr(coi.host, "setup", lambda **kw: captured.update(kw) or False)
    from coi.cli.commands.host import setup
    setup(ctx)
    from coi.incus import Incus
    monkeypatch.setattr(Incus, "from_environment", classmethod(lambda c, project: SimpleNamespace(project=project)))
    del ctx.__dict__["incus"]
    return {
        "image": req.image, "persistent": req.persistent, "max_slots": req.max_slots, "tool": req.tool.name,
        "binary": req.binary, "env": req.env, "lock_dir": req.lock_dir, "storage": req.storage,
        "project": ctx.incus.project, "group": captured["group"], "code_uid": req.code_uid,
        "shift": req.shift, "mounts": devices.get("mount1", {}).get("path"),
        "cpu": config.get("limits.cpu"), "memory": config.get("limits.memory"),
        "policy": network.plan(cfg.network, env={}),
    }


CASES = [
    ("defaults.image", '[defaults]\nimage = "coi-other"', lambda d: d["image"]),
    ("defaults.persistent", "[defaults]\npersistent = true", lambda d: d["persistent"]),
    ("defaults.max_slots", "[defaults]\nmax_slots = 3", lambda d: d["max_slots"]),
    ("tool.name", '[tool]\nname = "codex"', lambda d: d["tool"]),
    ("tool.binary", '[tool]\nbinary = "my-claude"', lambda d: d["binary"]),
    ("tool.env_passthrough", '[tool]\nenv_passthrough = ["PASSED"]', lambda d: d["env"]),
    ("paths.sessions_dir", '[paths]\nsessions_dir = "/srv/coi"', lambda d: d["lock_dir"]),
    ("paths.storage_dir", '[paths]\nstorage_dir = "/srv/storage"', lambda d: d["storage"].parent),
    ("incus.project", '[incus]\nproject = "agents"', lambda d: d["project"]),
    ("incus.group", '[incus]\ngroup = "lxd"', lambda d: d["group"]),
    ("incus.code_uid", "[incus]\ncode_uid = 1001", lambda d: d["code_uid"]),
    ("incus.disable_shift", "[incus]\ndisable_shift = true", lambda d: d["shift"]),
    ("network.mode", '[network]\nmode = "open"', lambda d: d["policy"].mode),
    ("network.allowed_domains", '[network]\nmode = "allowlist"\nallowed_domains = ["a.example"]',
     lambda d: d["policy"].allowed, '[network]\nmode = "allowlist"\nallowed_domains = ["b.example"]'),
    ("network.refresh_interval_minutes", "[network]\nrefresh_interval_minutes = 5",
     lambda d: d["policy"].refresh_seconds),
    ("network.block_private_networks", "[network]\nblock_private_networks = false", lambda d: d["policy"].blocked),
    ("network.block_metadata_endpoint", "[network]\nblock_metadata_endpoint = false",
     lambda d: d["policy"].blocked),
    ("network.allow_local_network_access", "[network]\nallow_local_network_access = true",
     lambda d: d["policy"].blocked),
    ("mounts.default", '[[mounts.default]]\nhost = "/srv/notes"\ncontainer = "/notes"', lambda d: d["mounts"]),
    ("limits.cpu", '[limits]\ncpu = "1"', lambda d: d["cpu"]),
    ("limits.memory", '[limits]\nmemory = "1GiB"', lambda d: d["memory"]),
]


@pytest.mark.parametrize("key, toml, probe, base", [(*c, "")[:4] for c in CASES], ids=[c[0] for c in CASES])
def test_each_key_has_an_effect(tmp_path, monkeypatch, key, toml, probe, base):
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: None)  # mounts and storage are not made here
    import coi.statedir
    monkeypatch.setattr(coi.statedir, "check_state_dir", lambda path, exposed=(): path)  # tests/security has it
    baseline = probe(derived(tmp_path / "a", base, monkeypatch))
    changed = probe(derived(tmp_path / "b", toml, monkeypatch))
    assert changed != baseline, key


@pytest.mark.skipif(not SPEC.exists(), reason="the contract (shared/spec) is not beside this checkout")
def test_the_cases_cover_the_contract():
    covered = {c[0] for c in CASES} | {k for k in contract_keys() if k.startswith("profiles.")}
    assert contract_keys() - covered == set()  # profiles: tests/unit/test_config.py and e2e/test_profiles.py
