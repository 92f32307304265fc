"""The configuration loader: layers, validation, expansion, rendering, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from coi.config import ENV_VARS, Mount, default_config, load_config, render_toml, to_json
from coi.errors import ConfigError

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[2] / "src"


class Layers:
    """Config files under tmp_path; ``load`` never looks at the real /etc or home."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.system = root / "etc" / "config.toml"
        self.user = self.home / ".config" / "coi" / "config.toml"
        self.workspace = root / "ws"
        self.workspace.mkdir(parents=True)
        self.home.mkdir(exist_ok=True)
        self.env = {"HOME": str(self.home)}

    @property
    def ws_file(self) -> Path:
        return self.workspace / ".coi.toml"

    def write(self, layer: str, text: str) -> Path:
        path = {"system": self.system, "user": self.user, "workspace": self.ws_file}[layer]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def load(self, env: dict[str, str] | None = None, flags: dict | None = None):
        return load_config(
            workspace=self.workspace,
            env={**self.env, **(env or {})},
            flags=flags or {},
            system_file=self.system,
            user_file=self.user,
        )


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return Layers(tmp_path)


def test_defaults(layers: Layers) -> None:
    loaded = layers.load()
    cfg = loaded.config
    assert (cfg.defaults.image, cfg.defaults.persistent, cfg.defaults.max_slots) == ("coi", False, 10)
    assert (cfg.tool.name, cfg.tool.binary, cfg.tool.env_passthrough) == ("claude", "", ())
    assert cfg.paths.sessions_dir == layers.home / ".coi"
    assert cfg.paths.storage_dir == layers.home / ".coi" / "storage"
    assert (cfg.incus.project, cfg.incus.group, cfg.incus.code_uid, cfg.incus.disable_shift) == (
        "default", "incus-admin", 1000, False)
    net = cfg.network
    assert (net.mode, net.allowed_domains, net.refresh_interval_minutes) == ("restricted", (), 30)
    assert (net.block_private_networks, net.block_metadata_endpoint, net.allow_local_network_access) == (
        True, True, False)
    assert (net.logging.enabled, net.logging.path) == (False, None)
    assert cfg.mounts.default == ()
    assert (cfg.limits.cpu, cfg.limits.memory, cfg.limits.processes) == ("", "", 0)
    assert (cfg.build.base, cfg.build.tools) == ("", ("claude",))
    assert cfg.profiles == {}
    assert set(loaded.origins.values()) == {"default"}
    assert loaded.warnings == []
    assert loaded.files == [(layers.system, False), (layers.user, False), (layers.ws_file, False)]
    assert default_config(env=layers.env) == cfg


LAYER_ORDER = ["system", "user", "workspace", "env", "flag"]


@pytest.mark.parametrize("top", LAYER_ORDER)
def test_each_layer_overrides_the_ones_below(layers: Layers, top: str) -> None:
    env: dict[str, str] = {}
    flags: dict = {}
    for layer in LAYER_ORDER[: LAYER_ORDER.index(top) + 1]:
        if layer == "env":
            env = {"COI_IMAGE": "from-env", "COI_NETWORK_MODE": "open"}
        elif layer == "flag":
            flags = {"defaults.image": ("--image", "from-flag"), "network.mode": ("--network", "allowlist")}
        else:
            layers.write(layer, f'[defaults]\nimage = "from-{layer}"\n[network]\nmode = "allowlist"\n')
    loaded = layers.load(env=env, flags=flags)
    expected_origin = {
        "system": str(layers.system),
        "user": str(layers.user),
        "workspace": str(layers.ws_file),
        "env": "env COI_IMAGE",
        "flag": "flag --image",
    }[top]
    assert loaded.config.defaults.image == f"from-{top}"
    assert loaded.origins["defaults.image"] == expected_origin
    assert loaded.config.network.mode == ("open" if top == "env" else "allowlist")


@pytest.mark.parametrize(
    ("key", "low_layer", "high_layer", "env", "expected"),
    [
        ("defaults.persistent", "[defaults]\npersistent = true", "[defaults]\npersistent = false", {}, False),
        ("network.block_private_networks", "", "[network]\nblock_private_networks = false", {}, False),
        ("limits.processes", "[limits]\nprocesses = 50", "[limits]\nprocesses = 0", {}, 0),
        ("defaults.persistent", "[defaults]\npersistent = true", "", {"COI_PERSISTENT": "0"}, False),
        ("defaults.persistent", "", "", {"COI_PERSISTENT": "yes"}, True),
    ],
)
def test_explicit_false_and_zero_are_set_values(layers, key, low_layer, high_layer, env, expected) -> None:
    layers.write("system", low_layer)
    layers.write("user", high_layer)
    loaded = layers.load(env=env)
    assert loaded.values[key] == expected
    section, name = key.split(".")
    assert getattr(getattr(loaded.config, section), name) == expected


def test_a_layer_that_omits_a_key_keeps_the_lower_value(layers: Layers) -> None:
    layers.write("system", "[defaults]\npersistent = true\n[network]\nblock_private_networks = false\n")
    layers.write("user", '[defaults]\nimage = "other"\n')
    layers.write("workspace", "[network]\nrefresh_interval_minutes = 5\n")
    loaded = layers.load()
    assert loaded.config.defaults.persistent is True
    assert loaded.config.network.block_private_networks is False
    assert loaded.origins["defaults.persistent"] == str(layers.system)
    assert loaded.origins["defaults.image"] == str(layers.user)
    assert loaded.origins["network.refresh_interval_minutes"] == str(layers.ws_file)


def test_lists_replace_instead_of_appending(layers: Layers) -> None:
    layers.write("system", '[network]\nallowed_domains = ["a.com", "b.com"]\n'
                           '[[mounts.default]]\nhost = "/a"\ncontainer = "/a"\n')
    layers.write("user", '[network]\nallowed_domains = ["c.com"]\n[mounts]\ndefault = []\n')
    cfg = layers.load().config
    assert cfg.network.allowed_domains == ("c.com",)
    assert cfg.mounts.default == ()


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("~/data", "/h/data"),
        ("~", "/h"),
        ("$DATA/x", "/srv/data/x"),
        ("${DATA}/y", "/srv/data/y"),
        ("/opt/$NOT_SET/z", "/opt/$NOT_SET/z"),
        ("/plain", "/plain"),
    ],
)
def test_paths_expand_home_and_variables(layers: Layers, written: str, expected: str) -> None:
    layers.write("user", f'[paths]\nsessions_dir = "{written}"\n'
                         f'[[mounts.default]]\nhost = "{written}"\ncontainer = "/m"\n')
    cfg = layers.load(env={"HOME": "/h", "DATA": "/srv/data"}).config
    assert cfg.paths.sessions_dir == Path(expected)
    assert cfg.mounts.default == (Mount(host=Path(expected), container="/m"),)


def test_user_file_follows_xdg_config_home(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "coi").mkdir(parents=True)
    (xdg / "coi" / "config.toml").write_text('[defaults]\nimage = "xdg"\n')
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(xdg)}
    loaded = load_config(workspace=None, env=env, system_file=tmp_path / "none.toml")
    assert loaded.config.defaults.image == "xdg"
    assert loaded.files[1] == (xdg / "coi" / "config.toml", True)
    no_xdg = load_config(workspace=None, env={"HOME": "/h"}, system_file=tmp_path / "none.toml")
    assert no_xdg.files == [(tmp_path / "none.toml", False), (Path("/h/.config/coi/config.toml"), False)]


def test_toml_syntax_error_names_file_line_and_column(layers: Layers) -> None:
    path = layers.write("workspace", '[defaults]\nimage = "coi"\npersistent = tru\n')
    with pytest.raises(ConfigError) as err:
        layers.load()
    assert err.value.message.startswith(f"{path}: invalid TOML at line 3, column 14: ")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[network]\nmode = "closed"',
         'network.mode = "closed" is not allowed; use one of restricted, allowlist, open'),
        ("[defaults]\npersistent = 1", "defaults.persistent = 1 is not allowed; use true or false"),
        ("[defaults]\nmax_slots = true", "defaults.max_slots = true is not allowed; use a whole number from 1 to 99"),
        ("[defaults]\nmax_slots = 100", "defaults.max_slots = 100 is not allowed; use a whole number from 1 to 99"),
        ("[defaults]\nmax_slots = 2.5", "defaults.max_slots = 2.5 is not allowed"),
        ("[incus]\ncode_uid = 0", "incus.code_uid = 0 is not allowed; use a whole number >= 1"),
        ("[network]\nrefresh_interval_minutes = 0", "network.refresh_interval_minutes = 0 is not allowed"),
        ('[tool]\nname = "vim"', 'tool.name = "vim" is not allowed; use one of claude, aider'),
        ('[tool]\nenv_passthrough = "HOME"', 'tool.env_passthrough = "HOME" is not allowed; use a list of strings'),
        ('[build]\ntools = ["claude", "vim"]', "build.tools = [\"claude\", \"vim\"] is not allowed; use a list drawn"),
        ('[paths]\nstorage_dir = "relative/dir"',
         'paths.storage_dir = "relative/dir" is not allowed; use an absolute'),
        ('[[mounts.default]]\nhost = "~/x"', "mounts.default = [{\"host\": \"~/x\"}] is not allowed"),
        ('[[mounts.default]]\nhost = "~/x"\ncontainer = "rel"', "mounts.default = "),
        ('[limits]\ncpu = true', "limits.cpu = true is not allowed"),
        ('network = "open"', 'network = "open" is not allowed; use a table ([network])'),
        ('[profiles.x]\nnetwork = { mode = "closed" }', 'profiles.x.network.mode = "closed" is not allowed'),
        ('[profiles.x]\nenvironment = { A = 1 }', 'profiles.x.environment = {"A": 1} is not allowed'),
        ('[profiles."a.b"]\nimage = "x"', 'profile name "a.b" is not allowed'),
    ],
)
def test_wrong_value_names_file_key_given_and_allowed(layers: Layers, toml: str, expected: str) -> None:
    path = layers.write("user", toml + "\n")
    with pytest.raises(ConfigError) as err:
        layers.load()
    assert err.value.message.startswith(f"{path}: {expected}")


def test_unknown_keys_and_sections_are_warnings(layers: Layers) -> None:
    path = layers.write("workspace", '[network]\nmdoe = "open"\n[colors]\nx = 1\n'
                                     '[profiles.rust.netwrk]\nmode = "open"\n')
    loaded = layers.load()
    assert loaded.config.network.mode == "restricted"
    assert loaded.warnings == [
        f"{path}: unknown key network.mdoe is ignored; did you mean network.mode?",
        f"{path}: unknown section colors is ignored",
        f"{path}: unknown section profiles.rust.netwrk is ignored; did you mean profiles.rust.network?",
    ]


@pytest.mark.parametrize(
    ("var", "value", "allowed"),
    [
        ("COI_PERSISTENT", "maybe", "true or false"),
        ("COI_MAX_SLOTS", "ten", "a whole number from 1 to 99"),
        ("COI_MAX_SLOTS", "0", "a whole number from 1 to 99"),
        ("COI_TOOL", "vim", "one of claude, aider, codex, gemini, opencode"),
        ("COI_NETWORK_MODE", "closed", "one of restricted, allowlist, open"),
        ("COI_SESSIONS_DIR", "relative", "an absolute path"),
    ],
)
def test_bad_environment_value_names_the_variable(layers: Layers, var: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        layers.load(env={var: value})
    assert err.value.message.startswith(f'environment: {var} = "{value}" is not allowed; use {allowed}')
    assert err.value.hint == f"{var} sets {ENV_VARS[var]}"


@pytest.mark.parametrize(
    ("var", "text", "key", "value"),
    [
        ("COI_IMAGE", "img", "defaults.image", "img"),
        ("COI_PERSISTENT", "true", "defaults.persistent", True),
        ("COI_PERSISTENT", "No", "defaults.persistent", False),
        ("COI_MAX_SLOTS", "20", "defaults.max_slots", 20),
        ("COI_TOOL", "aider", "tool.name", "aider"),
        ("COI_TOOL_BINARY", "/usr/bin/claude2", "tool.binary", "/usr/bin/claude2"),
        ("COI_SESSIONS_DIR", "~/s", "paths.sessions_dir", Path("/h/s")),
        ("COI_STORAGE_DIR", "/st", "paths.storage_dir", Path("/st")),
        ("COI_INCUS_PROJECT", "coi", "incus.project", "coi"),
        ("COI_NETWORK_MODE", "open", "network.mode", "open"),
        ("COI_BUILD_BASE", "images:debian/12", "build.base", "images:debian/12"),
    ],
)
def test_every_environment_variable(layers: Layers, var: str, text: str, key: str, value) -> None:
    loaded = layers.load(env={"HOME": "/h", var: text})
    assert (loaded.values[key], loaded.origins[key]) == (value, f"env {var}")
    assert ENV_VARS[var] == key


def test_empty_environment_variable_counts_as_unset(layers: Layers) -> None:
    assert layers.load(env={"COI_IMAGE": ""}).origins["defaults.image"] == "default"


def test_bad_flag_value_names_the_flag(layers: Layers) -> None:
    with pytest.raises(ConfigError, match='command line: --network = "closed" is not allowed'):
        layers.load(flags={"network.mode": ("--network", "closed")})
    loaded = layers.load(flags={"defaults.persistent": ("--persistent", True)})
    assert (loaded.config.defaults.persistent, loaded.origins["defaults.persistent"]) == (True, "flag --persistent")


FULL_PROFILE = """
[profiles.rust]
image = "coi-rust"
persistent = true
tool = "codex"
environment = { RUST_BACKTRACE = "1", "WITH SPACE" = "a \\"quoted\\" value" }
mounts = [{ host = "~/cargo", container = "/home/code/.cargo" }]
network = { mode = "allowlist", allowed_domains = ["crates.io"] }

[profiles.rust.limits]
cpu = 4
memory = "8GiB"
processes = 0
"""


def test_profiles_are_parsed(layers: Layers) -> None:
    layers.write("user", FULL_PROFILE)
    rust = layers.load().config.profiles["rust"]
    assert (rust.image, rust.persistent, rust.tool) == ("coi-rust", True, "codex")
    assert rust.environment == {"RUST_BACKTRACE": "1", "WITH SPACE": 'a "quoted" value'}
    assert rust.mounts == (Mount(host=layers.home / "cargo", container="/home/code/.cargo"),)
    assert (rust.network_mode, rust.allowed_domains) == ("allowlist", ("crates.io",))
    assert (rust.limits.cpu, rust.limits.memory, rust.limits.processes) == ("4", "8GiB", 0)


def test_profiles_merge_per_name_and_key_across_layers(layers: Layers) -> None:
    layers.write("system", '[profiles.rust]\nimage = "sys-rust"\nenvironment = { A = "1" }\n'
                           '[profiles.go]\nimage = "coi-go"\n')
    layers.write("user", "[profiles.rust]\npersistent = false\n[profiles.rust.network]\nmode = \"open\"\n")
    layers.write("workspace", '[profiles.rust]\nimage = "ws-rust"\n')
    loaded = layers.load()
    rust = loaded.config.profiles["rust"]
    assert (rust.image, rust.persistent, rust.environment, rust.network_mode) == ("ws-rust", False, {"A": "1"}, "open")
    assert (rust.tool, rust.mounts, rust.limits.cpu) == (None, None, None)
    assert loaded.config.profiles["go"].image == "coi-go"
    assert loaded.origins["profiles.rust.image"] == str(layers.ws_file)
    assert loaded.origins["profiles.rust.persistent"] == str(layers.user)
    assert loaded.origins["profiles.rust.environment"] == str(layers.system)


def test_mounts_are_parsed(layers: Layers) -> None:
    layers.write("user", '[[mounts.default]]\nhost = "~/notes"\ncontainer = "/notes"\n'
                         '[[mounts.default]]\nhost = "/srv/data"\ncontainer = "/data"\n')
    assert layers.load().config.mounts.default == (
        Mount(host=layers.home / "notes", container="/notes"),
        Mount(host=Path("/srv/data"), container="/data"),
    )


def test_render_toml_reparses_and_names_origins(layers: Layers) -> None:
    layers.write("user", FULL_PROFILE + '\n[[mounts.default]]\nhost = "/n"\ncontainer = "/notes"\n')
    layers.write("workspace", '[defaults]\nimage = "ws"\n[network.logging]\nenabled = true\npath = "~/net.log"\n')
    loaded = layers.load(env={"COI_MAX_SLOTS": "3"})
    text = render_toml(loaded)
    assert tomllib.loads(text) == to_json(loaded)["config"]
    lines = text.splitlines()
    assert f'image = "ws"  # from {layers.ws_file}' in lines
    assert "max_slots = 3  # from env COI_MAX_SLOTS" in lines
    assert 'mode = "restricted"  # from default' in lines
    assert f'default = [{{ host = "/n", container = "/notes" }}]  # from {layers.user}' in lines
    assert f'cpu = "4"  # from {layers.user}' in lines
    assert all("# from " in line for line in lines if " = " in line)


def test_to_json_shape(layers: Layers) -> None:
    layers.write("user", '[[mounts.default]]\nhost = "~/n"\ncontainer = "/n"\n[profiles.p]\nimage = "i"\n')
    data = to_json(layers.load())
    assert set(data) == {"config", "origins"}
    config = data["config"]
    assert set(config) == {"defaults", "tool", "paths", "incus", "network", "mounts", "limits", "build", "profiles",
                           "sessions", "git", "credentials", "ports", "ssh", "security"}
    assert config["paths"]["sessions_dir"] == str(layers.home / ".coi")
    assert config["network"]["logging"] == {"enabled": False, "path": ""}
    assert config["build"]["tools"] == ["claude"]
    assert config["mounts"]["default"] == [{"host": str(layers.home / "n"), "container": "/n"}]
    assert config["profiles"] == {"p": {"image": "i"}}
    assert data["origins"]["defaults.image"] == "default"
    assert data["origins"]["profiles.p.image"] == str(layers.user)
    assert json.loads(json.dumps(data)) == data


# --- the command line, end to end ----------------------------------------------


def _coi(tmp_path: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "PYTHONPATH": str(SRC),
        **extra_env,
    }
    return subprocess.run([sys.executable, "-m", "coi", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_cli_config_show_json(tmp_path: Path) -> None:
    user_file = tmp_path / "xdg" / "coi" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[defaults]\npersistent = true\n[network]\ntypo = 1\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".coi.toml").write_text('[defaults]\nimage = "ws-image"\n')
    result = _coi(tmp_path, "config", "show", "--format", "json", "-w", str(ws), COI_MAX_SLOTS="4")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["config"]["defaults"] == {"image": "ws-image", "persistent": True, "max_slots": 4, "profile": "",
                                          "trust_workspace_config": False}
    assert data["origins"]["defaults.image"] == str(ws / ".coi.toml")
    assert data["origins"]["defaults.persistent"] == str(user_file)
    assert data["origins"]["defaults.max_slots"] == "env COI_MAX_SLOTS"
    assert f"Warning: {user_file}: unknown key network.typo is ignored" in result.stderr


def test_cli_config_show_reports_bad_config(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".coi.toml").write_text('[network]\nmode = "closed"\n')
    result = _coi(tmp_path, "config", "show", "-w", str(ws))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f'Error: {ws / ".coi.toml"}: network.mode = "closed" is not allowed' in result.stderr


def test_cli_config_path(tmp_path: Path) -> None:
    user_file = tmp_path / "xdg" / "coi" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("not = [valid\n")  # path lists files without parsing them
    ws = tmp_path / "ws"
    ws.mkdir()
    result = _coi(tmp_path, "config", "path", "-w", str(ws))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("/etc/coi/config.toml (")
    assert lines[1:] == [f"{user_file} (found)", f"{ws / '.coi.toml'} (not found)"]


# --- profiles and the untrusted workspace file ----------------------------------

PROFILES = """
[profiles.rust]
image = "coi-rust"
persistent = true
environment = { RUST_BACKTRACE = "1" }
network = { mode = "allowlist", allowed_domains = ["crates.io"] }
limits = { cpu = "2", memory = "4GiB", processes = 500 }

[profiles.light]
tool = "aider"
"""


@pytest.mark.parametrize(("profile_from", "env", "expected_image", "origin"), [
    ("flag", {}, "coi-rust", "profile rust"),
    ("config", {}, "coi-rust", "profile rust"),
    ("flag", {"COI_IMAGE": "env-image"}, "env-image", "env COI_IMAGE"),  # env is above profiles
])
def test_profile_applies_between_files_and_flags(layers, profile_from, env, expected_image, origin) -> None:
    layers.write("user", PROFILES + ('\n[defaults]\nprofile = "rust"\n' if profile_from == "config" else ""))
    layers.write("workspace", '[defaults]\nimage = "ws-image"\n')
    flags = {"defaults.profile": ("--profile", "rust")} if profile_from == "flag" else {}
    loaded = layers.load(env=env, flags=flags)
    cfg = loaded.config
    assert loaded.profile == "rust" and loaded.environment == {"RUST_BACKTRACE": "1"}
    assert (cfg.defaults.image, loaded.origins["defaults.image"]) == (expected_image, origin)
    assert cfg.defaults.persistent is True and cfg.network.mode == "allowlist"
    assert cfg.network.allowed_domains == ("crates.io",)
    assert (cfg.limits.cpu, cfg.limits.memory, cfg.limits.processes) == ("2", "4GiB", 500)


def test_flags_override_the_profile(layers) -> None:
    layers.write("user", PROFILES)
    loaded = layers.load(flags={"defaults.profile": ("--profile", "rust"), "defaults.image": ("--image", "mine")})
    assert loaded.config.defaults.image == "mine" and loaded.config.defaults.persistent is True


def test_unknown_profile_lists_the_defined_ones(layers) -> None:
    layers.write("user", PROFILES)
    with pytest.raises(ConfigError) as err:
        layers.load(flags={"defaults.profile": ("--profile", "nope")})
    assert "unknown profile 'nope'" in err.value.message and "light, rust" in err.value.hint


@pytest.mark.parametrize(("user", "workspace", "key", "expected", "ignored"), [
    ("", '[network]\nmode = "open"', "network.mode", "restricted", True),
    ("", '[network]\nmode = "allowlist"', "network.mode", "allowlist", False),  # stricter is fine
    ('[network]\nmode = "open"', '[network]\nmode = "restricted"', "network.mode", "restricted", False),
    ('[network]\nallowed_domains = ["a.org"]', '[network]\nallowed_domains = ["a.org", "evil.org"]',
     "network.allowed_domains", ("a.org",), True),
    ('[network]\nallowed_domains = ["a.org", "b.org"]', '[network]\nallowed_domains = ["a.org"]',
     "network.allowed_domains", ("a.org",), False),
    ("", "[network]\nblock_private_networks = false", "network.block_private_networks", True, True),
    ("", "[network]\nallow_local_network_access = true", "network.allow_local_network_access", False, True),
    ("", "[defaults]\ntrust_workspace_config = true", "defaults.trust_workspace_config", False, True),
    ("", '[network]\nprivileged_command = ["sh", "-c", "evil"]', "network.privileged_command", (), True),
    ("", '[network.logging]\npath = "/home/me/.bashrc"', "network.logging.path", None, True),
    ("", '[defaults]\nimage = "ws-image"', "defaults.image", "ws-image", False),
    ("", "[limits]\nmemory = \"1GiB\"", "limits.memory", "1GiB", False),
    ("[defaults]\ntrust_workspace_config = true", '[network]\nmode = "open"', "network.mode", "open", False),
    ("", '[git]\nisolation = "branch"', "git.isolation", "branch", False),  # stricter: allowed
    ('[git]\nisolation = "branch"', '[git]\nisolation = "shared"', "git.isolation", "branch", True),
    ("", "[git]\nkeep_spare = false", "git.keep_spare", True, True),
])
def test_untrusted_workspace_cannot_weaken_isolation(layers, user, workspace, key, expected, ignored) -> None:
    layers.write("user", user)
    layers.write("workspace", workspace)
    loaded = layers.load()
    assert loaded.values[key] == expected
    assert any(key in w and "ignored" in w for w in loaded.warnings) is ignored


def test_untrusted_workspace_mounts_stay_inside(layers, tmp_path) -> None:
    inside = layers.ws_file.parent / "notes"
    layers.write("workspace", f'[[mounts.default]]\nhost = "{inside}"\ncontainer = "/notes"\n'
                              '[[mounts.default]]\nhost = "/etc"\ncontainer = "/hostetc"\n')
    loaded = layers.load()
    assert loaded.config.mounts.default == ()
    assert any("outside the workspace (/etc)" in w for w in loaded.warnings)
    layers.write("workspace", f'[[mounts.default]]\nhost = "{inside}"\ncontainer = "/notes"\n')
    assert [m.container for m in layers.load().config.mounts.default] == ["/notes"]


def test_a_profile_can_make_sessions_branch_sessions(layers) -> None:
    layers.write("user", '[profiles.safe]\ngit = { isolation = "branch" }\n')
    assert layers.load().config.git.isolation == "shared"
    layers.write("user", '[profiles.safe]\ngit = { isolation = "branch" }\n[defaults]\nprofile = "safe"\n')
    assert layers.load().config.git.isolation == "branch"


def test_workspace_profiles_get_the_same_rules(layers) -> None:
    layers.write("workspace", '[profiles.ws]\nimage = "x"\nnetwork = { mode = "open" }\n[defaults]\nprofile = "ws"\n')
    loaded = layers.load()
    assert loaded.config.defaults.image == "x" and loaded.config.network.mode == "restricted"


def test_every_network_mode_has_a_strength():
    from coi.config.schema import NETWORK_MODES
    from coi.config.workspace import _MODE_STRENGTH

    assert set(_MODE_STRENGTH) == set(NETWORK_MODES)
