"""Secret masking (coi.sessions.masks): how patterns match, what a scan of a workspace finds
(links, skipped directories, limits, what git already holds), the devices coi asks Incus
for, their refresh on a reused container, the session start against FakeIncus, the
config key and what a project's .coi.toml may do to it, and --carry leaving masked paths
out of a branch copy. Real files and real git in temporary directories; no Incus."""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from coi import naming
from coi.config import default_config
from coi.config.schema import DEFAULT_MASKED_PATHS
from coi.errors import CoiError, ConfigError
from coi.sessions import lifecycle, masks, spec
from coi.sessions.lifecycle import Place
from fake_incus import FakeIncus
from session_doubles import Said
from gitrepos import first_commit, write
from configfiles import ConfigFiles

pytestmark = pytest.mark.unit


# ---- matching ----------------------------------------------------------------------------

def masked(patterns, path: str, *, is_dir: bool = False, skipped: tuple[bool, ...] | None = None) -> bool:
    return masks.Matcher(patterns).masked(tuple(path.split("/")), is_dir=is_dir, skipped=skipped)


@pytest.mark.parametrize("path, is_dir, expected", [
    (".env", False, True), ("deep/down/.env", False, True), (".env.local", False, True),
    (".env.example", False, True), ("x.env", False, False), (".envrc", False, False), ("env", False, False),
    (".ENV", False, False),  # case sensitive
    ("a.pem", False, True), ("certs/site/a.pem", False, True), ("a.pem.txt", False, False),
    ("tls.key", False, True), ("keys/tls.key", False, True), ("keyring", False, False),
    ("id_rsa", False, True), ("id_rsa.pub", False, True), ("home/.ssh/id_ed25519", False, True),
    ("secrets", True, True), ("secrets/x", False, True),  # the directory itself: masked as a whole
    ("src/secrets", True, False),  # secrets/** has a '/': anchored at the top
    ("src/ok.txt", False, False), ("src", True, False),
])
def test_the_default_patterns(path, is_dir, expected):
    assert masked(DEFAULT_MASKED_PATHS, path, is_dir=is_dir) is expected


@pytest.mark.parametrize("pattern, path, is_dir, expected", [
    ("/top.key", "top.key", False, True), ("/top.key", "sub/top.key", False, False),
    ("config/*.key", "config/a.key", False, True), ("config/*.key", "src/config/a.key", False, False),
    ("config/*.key", "config/sub/a.key", False, False),  # * stays within one part
    ("a/**/b", "a/b", False, True), ("a/**/b", "a/x/y/b", False, True), ("a/**/b", "b", False, False),
    ("**/deep/x", "deep/x", False, True), ("**/deep/x", "q/r/deep/x", False, True),
    ("cache/", "cache", True, True), ("cache/", "cache", False, False), ("cache/", "sub/cache", True, True),
    ("key?.txt", "key1.txt", False, True), ("key?.txt", "key10.txt", False, False),
    ("[ab].cfg", "a.cfg", False, True), ("[ab].cfg", "c.cfg", False, False),
    ("my key.pem", "dir/my key.pem", False, True),
])
def test_patterns_match_like_gitignore(pattern, path, is_dir, expected):
    assert masked([pattern], path, is_dir=is_dir) is expected


def test_the_last_matching_pattern_decides():
    patterns = [".env.*", "!.env.example", "*.example"]
    assert masked(patterns[:2], ".env.example") is False
    assert masked(patterns[:2], ".env.prod") is True
    assert masked(patterns, ".env.example") is True  # masked again by a later pattern


def test_names_alone_do_not_reach_into_dependencies_and_vcs_directories():
    matcher = masks.Matcher([*DEFAULT_MASKED_PATHS, "node_modules/pkg/token.key", "/.git/config"])
    assert not matcher.masked(("node_modules", "x", "a.pem"), is_dir=False, skipped=(True, False))
    assert matcher.masked(("node_modules", "pkg", "token.key"), is_dir=False, skipped=(True, False))
    assert matcher.masked((".git", "config"), is_dir=False, skipped=(True,))
    assert not matcher.reaches_below(("node_modules", "other"), (True, False))
    assert matcher.reaches_below(("node_modules",), (True,)) and matcher.reaches_below(("src",), (False,))
    assert not masks.Matcher(["/.env"]).reaches_below(("src",), (False,))  # anchored: nothing to find below


# ---- the scan ----------------------------------------------------------------------------

def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        write(root / rel, text)
    return root


def found(workspace: Path, patterns=DEFAULT_MASKED_PATHS) -> list[str]:
    return [m.shown for m in masks.scan(workspace, patterns).masks]


def test_a_scan_finds_files_and_whole_directories(tmp_path):
    ws = tree(tmp_path / "ws", {".env": "TOKEN=1\n", "a.pem": "pem", "secrets/x": "x", "secrets/deep/y": "y",
                                "src/ok.txt": "ok", "src/config/db.key": "k", "my key.pem": "spaces",
                                "naïve.key": "utf-8"})
    assert found(ws) == [".env", "a.pem", "my key.pem", "naïve.key", "secrets/", "src/config/db.key"]


def test_names_incus_cannot_take_are_not_masked_but_said(tmp_path):
    ws = tree(tmp_path / "ws", {"line\nbreak.pem": "x", ".env": "x"})
    (ws / os.fsdecode(b"bad\xff.key")).write_text("x")
    result = masks.scan(ws, DEFAULT_MASKED_PATHS)
    assert [m.rel for m in result.masks] == [".env"]
    assert sorted(result.unmaskable) == ["bad\\xff.key", "line\\nbreak.pem"]
    assert any(level == "warn" and "bad\\xff.key" in line for level, line in masks.notes(result))


def test_links_are_resolved_as_the_container_sees_them(tmp_path):
    outside = tree(tmp_path / "outside", {".env": "HOST SECRET", "id_rsa": "KEY"})
    ws = tree(tmp_path / "ws", {"config/prod.env": "P=1", "private/k": "k"})
    (ws / ".env").symlink_to("config/prod.env")
    (ws / ".env.local").symlink_to("/workspace/config/prod.env")  # absolute, as the container sees it
    (ws / "shadow.key").symlink_to("/etc/shadow")
    (ws / "up.pem").symlink_to("../outside/id_rsa")
    (ws / "loop.key").symlink_to("loop.key")
    (ws / "secrets").symlink_to("private")
    (ws / "linked").symlink_to(outside)  # a directory link: never walked into
    result = masks.scan(ws, DEFAULT_MASKED_PATHS)
    assert [m.shown for m in result.masks] == [".env -> config/prod.env", "secrets -> private/"]
    assert sorted(result.elsewhere) == ["loop.key", "shadow.key", "up.pem"]
    assert not any(m.rel.startswith("linked") for m in result.masks)


def test_a_link_to_the_whole_workspace_is_not_masked(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "secrets").symlink_to(".")
    assert found(ws) == []


def test_dependencies_and_vcs_directories_are_not_looked_into(tmp_path):
    ws = tree(tmp_path / "ws", {"node_modules/agent-base/test/ssl.key": "x", ".git/x.key": "x",
                                ".venv/lib/python3.11/site-packages/certifi/cacert.pem": "CA",
                                "vendor/lib/tls.pem": "x", "app/.env": "x"})
    assert found(ws) == ["app/.env"]
    assert found(ws, ["/.git/x.key"]) == [".git/x.key"]  # a pattern that names the directory reaches in


def test_a_long_scan_stops_but_looks_at_the_top_first(tmp_path, monkeypatch):
    files = {f"d{i}/f{j}.txt": "" for i in range(5) for j in range(20)}
    ws = tree(tmp_path / "ws", {**files, "zz/.env": "deep", ".env": "top"})
    monkeypatch.setattr(masks, "MAX_ENTRIES", 30)
    result = masks.scan(ws, DEFAULT_MASKED_PATHS)
    assert result.truncated and result.entries == 31
    assert [m.rel for m in result.masks] == [".env"]
    assert any(level == "warn" and "not masked" in line for level, line in masks.notes(result))
    monkeypatch.setattr(masks, "MAX_ENTRIES", 10_000)
    monkeypatch.setattr(masks, "MAX_DEPTH", 1)
    deep = tree(tmp_path / "deep", {"a/b/.env": "x", "a/.env": "y"})
    result = masks.scan(deep, DEFAULT_MASKED_PATHS)
    assert result.truncated and [m.rel for m in result.masks] == ["a/.env"]


def test_no_positive_pattern_means_no_scan(tmp_path):
    ws = tree(tmp_path / "ws", {".env": "x"})
    assert masks.scan(ws, []) is masks.NOTHING
    assert masks.scan(ws, ["!.env"]) is masks.NOTHING


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
                               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("object_format", ["sha1", "sha256"])
def test_files_whose_content_git_holds_are_not_masked(tmp_path, object_format):
    ws = tree(tmp_path / "ws", {".env.example": "A=\n", "certs/test.pem": "fixture", ".env.prod": "P=public\n"})
    git(ws, "init", "-q", f"--object-format={object_format}")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "fixtures")
    write(ws / ".env", "TOKEN=secret\n")  # untracked
    write(ws / ".env.prod", "P=the real one\n")  # tracked, changed: the new content is not in git
    result = masks.scan(ws, DEFAULT_MASKED_PATHS)
    assert [m.rel for m in result.masks] == [".env", ".env.prod"]
    assert result.in_git == (".env.example", "certs/test.pem")


def test_git_is_asked_only_about_a_repository_the_container_sees(tmp_path):
    main = first_commit(tmp_path / "main", git)
    write(main / "tls.pem", "committed")
    git(main, "add", "-A")
    git(main, "commit", "-qm", "pem")
    git(main, "worktree", "add", "-q", str(tmp_path / "wt"))  # its .git is a file: the objects are elsewhere
    assert [m.rel for m in masks.scan(tmp_path / "wt", DEFAULT_MASKED_PATHS).masks] == ["tls.pem"]
    assert masks.scan(main, DEFAULT_MASKED_PATHS).in_git == ("tls.pem",)
    write(main / ".git" / "objects" / "info" / "alternates", str(tmp_path / "elsewhere") + "\n")
    assert [m.rel for m in masks.scan(main, DEFAULT_MASKED_PATHS).masks] == ["tls.pem"]


# ---- the devices ------------------------------------------------------------------------

def state_dir(tmp_path: Path) -> Path:
    """coi's state directory, as the session has checked it."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def test_each_mask_is_a_read_only_disk_device_from_coi_s_empty_sources(tmp_path):
    src = masks.sources(state_dir(tmp_path), "1a2b3c4d")
    assert src.file == tmp_path / "state" / "masks" / "1a2b3c4d" / "empty"
    assert src.file.read_bytes() == b"" and stat.S_IMODE(src.file.stat().st_mode) == 0o444
    assert list(src.directory.iterdir()) == [] and stat.S_IMODE(src.directory.stat().st_mode) == 0o555
    devices = masks.devices([masks.Mask(".env", False), masks.Mask("secrets", True)], src)
    assert devices == {
        masks.device_name(".env"): {"type": "disk", "source": str(src.file), "path": "/workspace/.env",
                                    "readonly": "true"},
        masks.device_name("secrets"): {"type": "disk", "source": str(src.directory), "path": "/workspace/secrets",
                                       "readonly": "true"}}
    assert all(name.startswith(spec.MASK_DEVICE) and len(name) == 25 for name in devices)
    assert masks.device_name("a b") == masks.device_name("a b") != masks.device_name("a  b")


def test_sources_a_container_filled_are_made_empty_again(tmp_path):
    state = state_dir(tmp_path)
    src = masks.sources(state, "h")
    os.chmod(src.file, 0o644)
    src.file.write_text("written by root in a container\n")
    os.chmod(src.directory, 0o755)
    (src.directory / "planted").mkdir()
    (src.directory / "link").symlink_to(tmp_path / "victim")
    victim = tree(tmp_path / "victim", {"keep": "mine"})
    again = masks.sources(state, "h")
    assert again == src and src.file.read_bytes() == b"" and list(src.directory.iterdir()) == []
    assert (victim / "keep").read_text() == "mine"  # nothing was followed
    src.file.unlink()
    src.file.symlink_to(victim / "keep")
    masks.sources(state, "h")
    assert not src.file.is_symlink() and (victim / "keep").read_text() == "mine"


def test_too_many_masks_are_refused_before_anything_exists(tmp_path, monkeypatch):
    ws = tree(tmp_path / "ws", {f"certs/c{i}.pem": "" for i in range(4)})
    monkeypatch.setattr(masks, "MAX_MASKS", 3)
    with pytest.raises(CoiError, match="4 paths of the workspace match") as exc:
        masks.plan(tmp_path / "state", ws, DEFAULT_MASKED_PATHS, "h")
    assert "certs/**" in exc.value.hint and not (tmp_path / "state").exists()
    assert masks.plan(tmp_path / "state", ws, ["/nothing"], "h")[1] == {}
    assert not (tmp_path / "state").exists()  # no sources without masks


def container_with(fake: FakeIncus, devices: dict) -> str:
    fake.create_instance("coi-test-1a2b3c4d-1", image="coi", devices=devices)
    return "coi-test-1a2b3c4d-1"


def test_a_refresh_removes_stale_masks_and_adds_the_new_ones_in_one_request(tmp_path):
    src = masks.sources(state_dir(tmp_path), "h")
    workspace = {"type": "disk", "source": str(tmp_path), "path": "/workspace"}
    old = masks.devices([masks.Mask(".env", False), masks.Mask("gone.pem", False)], src)
    fake = FakeIncus()
    name = container_with(fake, {"workspace": workspace, **old})
    wanted = masks.devices([masks.Mask(".env", False), masks.Mask("new.key", False)], src)
    fake.calls.clear()
    masks.refresh(fake, name, wanted)
    assert fake.instance(name)["devices"] == {"workspace": workspace, **wanted}
    assert [c[0] for c in fake.calls if c[0] != "instance"] == ["remove_device", "update_instance"]
    assert fake.called("update_instance")[0].kwargs["devices"] == {masks.device_name("new.key"):
                                                                    wanted[masks.device_name("new.key")]}
    fake.calls.clear()
    masks.refresh(fake, name, wanted)
    assert [c[0] for c in fake.calls if c[0] != "instance"] == []  # nothing changed: nothing asked
    masks.refresh(fake, name, {})
    assert fake.instance(name)["devices"] == {"workspace": workspace}


def test_a_mask_source_passes_the_start_check_and_a_swapped_one_does_not(tmp_path):
    src = masks.sources(state_dir(tmp_path), "h")
    ws = tmp_path / "ws"
    ws.mkdir()
    inst = {"name": "c", "devices": {"workspace": {"type": "disk", "source": str(ws), "path": "/workspace"},
                                     **masks.devices([masks.Mask(".env", False)], src)}}
    spec.check_mount_sources(inst)
    src.file.unlink()
    src.file.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CoiError, match="is a link now"):
        spec.check_mount_sources(inst)
    inst["devices"]["mount1"] = {"type": "disk", "source": str(tmp_path / "state" / "masks" / "h" / "x"),
                                 "path": "/x"}
    (tmp_path / "state" / "masks" / "h" / "x").write_text("")
    inst["devices"].pop(masks.device_name(".env"))
    with pytest.raises(CoiError, match="not a directory"):  # only a mask may have a file as its source
        spec.check_mount_sources(inst)


def test_the_start_line_names_the_first_few():
    assert masks.summary([]) is None
    assert masks.summary([".env", "secrets/"]) == \
        "Masked 2 path(s), empty and read-only in the container: .env, secrets/"
    line = masks.summary([f"f{i}.pem" for i in range(8)])
    assert line.endswith("f0.pem, f1.pem, f2.pem, f3.pem, f4.pem and 3 more")


# ---- a session's start, against FakeIncus ---------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    from coi import network as net

    monkeypatch.setattr(net, "applies_before_start", lambda inst, policy, sessions_dir: True)
    monkeypatch.setattr(net, "apply", lambda client, name, policy, **kw: "nft")
    monkeypatch.setattr(net, "remove", lambda name, **kw: None)
    monkeypatch.setattr(net, "pin_nic", lambda client, instances: None)
    return home


def place_for(home: Path, workspace: Path, fake: FakeIncus, patterns=DEFAULT_MASKED_PATHS) -> Place:
    config = default_config(env={"HOME": str(home)})
    config = replace(config, security=replace(config.security, masked_paths=tuple(patterns)))
    state = home / ".coi"
    return Place(client=fake, config=config, workspace=workspace, messages=Said(),
                 state_dir=lambda: state.mkdir(mode=0o700, exist_ok=True) or state)


def start(place: Place, **kw):
    req = lifecycle.request(place, slot=0, env=[], mount=[], storage=None, profile_env={}, profile=None, **kw)
    session = lifecycle.open_session(place, req)
    lifecycle.start(place, session, req, None, debug=False, tmux_session=True)
    return req, session


def mask_devices(fake: FakeIncus, name: str) -> dict[str, str]:
    return {d["path"]: d["source"] for n, d in fake.instance(name)["devices"].items() if n.startswith("coi-mask-")}


def test_a_new_container_is_created_with_its_masks_and_the_start_names_them(home, tmp_path):
    ws = tree(tmp_path / "ws", {".env": "TOKEN=1", "a.pem": "x", "secrets/x": "x", "src/ok.txt": "ok"})
    fake = FakeIncus()
    place = place_for(home, ws, fake)
    req, session = start(place)
    created = fake.called("create_instance")[0].kwargs["devices"]
    sources = home / ".coi" / "masks" / naming.workspace_hash(str(ws))
    assert {d["path"]: d["source"] for n, d in created.items() if n.startswith("coi-mask-")} == {
        "/workspace/.env": str(sources / "empty"), "/workspace/a.pem": str(sources / "empty"),
        "/workspace/secrets": str(sources / "empty.d")}
    assert all(d["readonly"] == "true" for n, d in created.items() if n.startswith("coi-mask-"))
    assert not fake.called("update_instance")  # no second request for a new container
    line = "Masked 3 path(s), empty and read-only in the container: .env, a.pem, secrets/"
    assert ("info", line) in place.messages.lines
    infos = [text for level, text in place.messages.lines if level == "info"]
    assert infos.index(line) < infos.index("Starting session...")
    assert (ws / ".env").read_text() == "TOKEN=1"  # the host's files are not touched


def test_a_reused_container_gets_its_masks_refreshed_before_it_starts(home, tmp_path):
    ws = tree(tmp_path / "ws", {".env": "x", "old.pem": "x"})
    fake = FakeIncus()
    place = place_for(home, ws, fake)
    _, first = start(place, persistent=True)
    fake.stop(first.name)
    (ws / "old.pem").unlink()
    write(ws / "new.key", "x")
    fake.calls.clear()
    _, again = start(place, persistent=True)
    assert again.name == first.name and not again.created
    assert set(mask_devices(fake, again.name)) == {"/workspace/.env", "/workspace/new.key"}
    order = [c[0] for c in fake.calls]
    assert order.index("update_instance") < order.index("start")  # masked before anything runs


def test_coi_run_masks_too_and_an_empty_list_masks_nothing(home, tmp_path, monkeypatch):
    ws = tree(tmp_path / "ws", {".env": "x"})
    fake = FakeIncus()
    place = place_for(home, ws, fake, patterns=())
    req = lifecycle.request(place, slot=0, env=[], mount=[], storage=None, profile_env={}, profile=None)
    assert req.masks == {} and req.masked == () and not (home / ".coi" / "masks").exists()
    place = place_for(home, ws, fake)
    req = lifecycle.request(place, slot=0, env=[], mount=[], storage=None, profile_env={}, profile=None)
    monkeypatch.setattr(lifecycle, "_run_command", lambda place, session, req, command, **kw:
                        mask_devices(fake, session.name))
    assert lifecycle.run(place, req, ["true"], capture=True, timeout=0) == {
        "/workspace/.env": str(home / ".coi" / "masks" / naming.workspace_hash(str(ws)) / "empty")}
    assert ("info", "Masked 1 path(s), empty and read-only in the container: .env") in place.messages.lines


def test_a_branch_session_has_no_masks(home, tmp_path):
    place = place_for(home, tree(tmp_path / "ws", {".env": "x"}), FakeIncus())
    assert lifecycle._masks(place, branch=object()) == ((), {})


# ---- the config key ------------------------------------------------------------------------

Files = ConfigFiles


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path)


def test_the_users_own_config_replaces_the_list(files):
    assert files.load().config.security.masked_paths == DEFAULT_MASKED_PATHS
    loaded = files.load(user='[security]\nmasked_paths = [".env", "!.env.example", "/deploy/*.json"]\n')
    assert loaded.config.security.masked_paths == (".env", "!.env.example", "/deploy/*.json")
    assert files.load(user="[security]\nmasked_paths = []\n").config.security.masked_paths == ()


def test_a_workspace_file_can_only_add_to_the_list(files):
    loaded = files.load(workspace='[security]\nmasked_paths = ["*.secret", ".env"]\n')
    assert loaded.config.security.masked_paths == (*DEFAULT_MASKED_PATHS, "*.secret")
    assert loaded.warnings == []
    assert loaded.origins["security.masked_paths"] == f"default + {files.workspace / '.coi.toml'}"
    # A list without the defaults does not remove them, nor the user's own.
    loaded = files.load(workspace='[security]\nmasked_paths = []\n', user='[security]\nmasked_paths = ["/mine"]\n')
    assert loaded.config.security.masked_paths == ("/mine",)


def test_a_workspace_file_cannot_unmask(files):
    loaded = files.load(workspace='[security]\nmasked_paths = ["!.env", "*.secret"]\n')
    assert loaded.config.security.masked_paths == DEFAULT_MASKED_PATHS
    assert len(loaded.warnings) == 1 and "cannot unmask" in loaded.warnings[0]


def test_trusting_the_workspace_lets_it_replace_the_list(files):
    loaded = files.load(workspace='[security]\nmasked_paths = ["/only"]\n',
                        user="[defaults]\ntrust_workspace_config = true\n")
    assert loaded.config.security.masked_paths == ("/only",)


@pytest.mark.parametrize("bad", ['[""]', '["a/../b"]', '["./x"]', '["a//b"]', '["!"]', '["/"]', '["a\\nb"]',
                                 '".env"', "[1]"])
def test_bad_patterns_are_refused_with_the_key_named(files, bad):
    with pytest.raises(ConfigError, match="masked_paths .* is not allowed; use a list of path patterns"):
        files.load(user=f"[security]\nmasked_paths = {bad}\n")


# ---- --carry leaves masked paths out of a branch copy ------------------------------------

def test_carry_leaves_masked_paths_and_their_content_out_of_the_copy(tmp_path, monkeypatch):
    from coi.branches import copies

    home = tmp_path / "home"
    write(home / ".gitconfig", "[user]\n\tname = P\n\temail = p@example.invalid\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    repo = first_commit(tmp_path / "ws", git)
    write(repo / ".env.prod", "P=committed\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "prod env")
    write(repo / ".env", "TOKEN=untracked-secret\n")
    write(repo / "secrets" / "db", "DB=untracked-secret\n")
    write(repo / ".env.prod", "P=changed-secret\n")
    write(repo / "notes.txt", "carried\n")
    branch, _ = copies.reserve(tmp_path / "state", repo, "alpha")
    copies.fill(branch, carry=True, exclude=masks.git_excludes(DEFAULT_MASKED_PATHS))
    assert (branch.copy / "notes.txt").read_text() == "carried\n"
    assert not (branch.copy / ".env").exists() and not (branch.copy / "secrets").exists()
    assert (branch.copy / ".env.prod").read_text() == "P=committed\n"  # the index's version
    blobs = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=branch.copy,
                           capture_output=True).stdout
    assert b"untracked-secret" not in blobs and b"changed-secret" not in blobs


def test_git_excludes_cover_names_anchored_paths_and_directories():
    assert masks.git_excludes(["*.pem", "/top.key", "config/x", "secrets/**", "cache/", "!keep"]) == [
        ":(exclude,glob)**/*.pem", ":(exclude,glob)**/*.pem/**",
        ":(exclude,glob)top.key", ":(exclude,glob)top.key/**",
        ":(exclude,glob)config/x", ":(exclude,glob)config/x/**",
        ":(exclude,glob)secrets/**", ":(exclude,glob)secrets/**/**",
        ":(exclude,glob)**/cache", ":(exclude,glob)**/cache/**"]
