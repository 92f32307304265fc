"""The pure logic of coi.images, table by table: base references and image names, the
coi image's inputs, the builder's resolver checks, image rows and clean-up plans, the
log file and step lines, the bootstrap's inputs, and the builder's lost-PID policy."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from coi import config as coi_config
from coi import images, tools
from coi.errors import CoiError, UsageError
from coi.images import bootstrap, inputs, manage, progress, refs, run
from coi.images.log import BuildLog
from coi.incus import EXEC_NOT_STARTED

pytestmark = pytest.mark.unit


# --- base references and image names ------------------------------------------------------


@pytest.mark.parametrize("ref, default, expected", [
    (None, "coi", images.Base("coi", alias="coi")),
    ("", images.DEFAULT_BASE, images.Base("bootstrap:debian/trixie")),
    ("  ", "coi", images.Base("coi", alias="coi")),
    ("bootstrap:debian/trixie", "coi", images.Base("bootstrap:debian/trixie")),
    ("bootstrap:debian/bookworm", "coi", images.Base("bootstrap:debian/bookworm")),
    ("images:debian/12", "coi", images.Base("images:debian/12", remote="debian/12",
                                            fallback="bootstrap:debian/bookworm")),
    ("images:debian/13", "coi", images.Base("images:debian/13", remote="debian/13",
                                            fallback="bootstrap:debian/trixie")),
    ("images:/debian/12/", "coi", images.Base("images:/debian/12/", remote="debian/12",
                                              fallback="bootstrap:debian/bookworm")),
    ("images:ubuntu/24.04", "coi", images.Base("images:ubuntu/24.04", remote="ubuntu/24.04",
                                               fallback="bootstrap:debian/trixie")),
    ("my-image", "coi", images.Base("my-image", alias="my-image")),
    ("team/app.v2", "coi", images.Base("team/app.v2", alias="team/app.v2")),
])
def test_parse_base(ref, default, expected):
    assert images.parse_base(ref, default=default) == expected


@pytest.mark.parametrize("ref", ["bootstrap:debian/sid", "bootstrap:ubuntu/noble", "images:", "images:/",
                                 "bad name!", "-dash"])
def test_parse_base_refuses_nonsense(ref):
    with pytest.raises(CoiError):
        images.parse_base(ref)


@pytest.mark.parametrize("remote, fallback", [
    ("debian/12", "bootstrap:debian/bookworm"),
    ("Debian/Bookworm/cloud", "bootstrap:debian/bookworm"),
    ("debian/13", "bootstrap:debian/trixie"),
    ("debian", "bootstrap:debian/trixie"),
    ("alpine/3.20", "bootstrap:debian/trixie"),
])
def test_fallback_for(remote, fallback):
    assert refs.fallback_for(remote) == fallback


@pytest.mark.parametrize("base, source", [
    (images.Base("x", alias="x"), {"type": "image", "alias": "x"}),
    (images.parse_base("images:debian/12"), {"type": "image", "mode": "pull",
                                             "server": "https://images.linuxcontainers.org",
                                             "protocol": "simplestreams", "alias": "debian/12"}),
])
def test_base_source(base, source):
    assert base.source() == source


@pytest.mark.parametrize("alias, ok", [
    ("coi", True), ("coi-test-x", True), ("team/app.v2_1", True), ("A" * 200, True),
    ("", False), ("has space", False), ("remote:alias", False), ("-dash", False), ("A" * 201, False),
    (".hidden", False),
])
def test_check_alias(alias, ok):
    if ok:
        refs.check_alias(alias)
    else:
        with pytest.raises(UsageError):
            refs.check_alias(alias)


# --- the coi image's inputs -------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    (["claude"], ["claude"]),
    (["aider", "claude", " claude"], ["claude", "aider"]),
    (["opencode", "gemini", "codex", "claude"], ["claude", "codex", "gemini", "opencode"]),
    (["all"], ["claude", "codex", "gemini", "opencode", "aider"]),
    (["aider", "all", ""], ["claude", "codex", "gemini", "opencode", "aider"]),
])
def test_normalise_tools(given, expected):
    assert images.normalise_tools(given) == expected


@pytest.mark.parametrize("given, message", [
    (["claude", "vim"], "unknown agent tool 'vim'"),
    ([""], "no agent tool given"),
    ([], "no agent tool given"),
    (["Claude"], "unknown agent tool 'Claude'"),
])
def test_normalise_tools_refuses(given, message):
    with pytest.raises(UsageError, match=message) as exc:
        images.normalise_tools(given)
    assert exc.value.hint == "choose from claude, codex, gemini, opencode, aider"


def test_tool_names_agree_everywhere():
    """config.TOOLS, tools.TOOLS and the image's TOOL_PACKAGES name the same agent tools,
    and the coi image's build script installs every package named here."""
    assert set(images.TOOL_PACKAGES) == set(coi_config.TOOLS) == set(tools.TOOLS)
    script = images.coi_script().read_text()
    for _, package in images.TOOL_PACKAGES.values():
        assert package in script


def _config(code_uid: int = 1000, base: str = "images:debian/12"):
    return SimpleNamespace(build=SimpleNamespace(base=base), incus=SimpleNamespace(code_uid=code_uid))


@pytest.fixture
def ca(tmp_path) -> Path:
    path = tmp_path / "corp.crt"
    path.write_text("cert A")
    return path


def _hash(ca: Path, **kw) -> str:
    given = {"tools": ["claude"], "config": _config(), "script": b"s", "base": "images:debian/12",
             "ca_files": [ca], **kw}
    return images.coi_inputs_hash(**given)


@pytest.mark.parametrize("change", [
    {"tools": ["claude", "claude"]},
    {"tools": [" claude "]},
    {"base": None},  # the config's base is the same
    {"config": _config(base="images:ubuntu/24.04")},  # an explicit base wins over the config's
])
def test_inputs_hash_ignores(ca, change):
    assert _hash(ca, **change) == _hash(ca)


@pytest.mark.parametrize("change", [
    {"tools": ["codex"]},
    {"tools": ["claude", "codex"]},
    {"script": b"t"},
    {"base": "images:ubuntu/24.04"},
    {"ca_files": []},
    {"config": _config(code_uid=1001)},
])
def test_inputs_hash_follows(ca, change):
    assert _hash(ca, **change) != _hash(ca)


def test_inputs_hash_follows_the_content_and_name_of_ca_files(ca, tmp_path):
    before = _hash(ca)
    ca.write_text("cert B")
    assert _hash(ca) != before
    other = tmp_path / "other.crt"
    other.write_text("cert B")
    assert _hash(other) != _hash(ca)


def test_inputs_hash_of_bootstrap_base_follows_the_mirror(monkeypatch):
    monkeypatch.setattr(bootstrap, "host_debian_mirror", lambda: "http://a/debian")
    first = images.coi_inputs_hash(tools=["claude"], config=_config(base="bootstrap:debian/trixie"),
                                   script=b"s", ca_files=[])
    monkeypatch.setattr(bootstrap, "host_debian_mirror", lambda: "http://b/debian")
    assert images.coi_inputs_hash(tools=["claude"], config=_config(base="bootstrap:debian/trixie"),
                                  script=b"s", ca_files=[]) != first


def test_inputs_hash_of_the_default_base(ca, monkeypatch):
    monkeypatch.setattr(bootstrap, "host_debian_mirror", lambda: "http://a/debian")
    assert _hash(ca, base="", config=_config(base="")) == _hash(ca, base=images.DEFAULT_BASE)


@pytest.mark.parametrize("parts, other", [
    ([b"ab"], [b"a", b"b"]),
    ([b"a", b""], [b"a"]),
    ([b"a", b"b"], [b"b", b"a"]),
])
def test_sha_tells_parts_apart(parts, other):
    assert images.sha(parts) != images.sha(other)
    assert len(images.sha(parts)) == 16


def test_host_ca_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.crt", "a.crt", "sub/c.crt", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "dir.crt").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in inputs.host_ca_files(tmp_path)] == [
        "a.crt", "b.crt", "sub/c.crt"]
    assert inputs.host_ca_files(tmp_path / "missing") == []


# --- the builder's network -----------------------------------------------------------


@pytest.mark.parametrize("text, stub", [
    ("nameserver 127.0.0.53\n", True),
    ("nameserver 127.0.0.1\nsearch lan\n", True),
    ("# nothing\n", True),
    ("", True),
    ("nameserver ::1\n", True),
    ("nameserver fe80::1%eth0\n", False),
    ("nameserver not-an-address\nnameserver 127.0.0.53\n", True),
    ("nameserver 10.195.0.1\n", False),
    ("nameserver 127.0.0.53\nnameserver 1.1.1.1\n", False),
])
def test_resolv_is_stub_only(text, stub):
    assert images.resolv_is_stub_only(text) is stub


ROUTES = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
          "eth0\t00000000\t0100C30A\t0003\t0\t0\t1024\t00000000\n"
          "eth0\t0000C30A\t00000000\t0001\t0\t0\t1024\t00FFFFFF\n")


@pytest.mark.parametrize("text, device, gateway", [
    (ROUTES, "eth0", "10.195.0.1"),
    (ROUTES, "eth1", None),
    ("Iface\n", "eth0", None),
    ("", "eth0", None),
    ("Iface\tDestination\tGateway\neth0\t00000000\t00000000\n", "eth0", None),  # default route, no gateway
    ("Iface\tDestination\tGateway\neth0\t00000000\t0101A8C0\n", "eth0", "192.168.1.1"),
])
def test_default_gateway(text, device, gateway):
    assert images.default_gateway(text, device) == gateway


# --- image rows, sizes, times and clean-up plans -------------------------------------------


def _image(fp, aliases, *, kind=True, created="2026-01-01T00:00:00Z", size=1000):
    props = {"coi.kind": "coi", "description": f"image {fp}"} if kind else {}
    return {"fingerprint": fp, "aliases": [{"name": a} for a in aliases], "size": size,
            "created_at": created, "properties": props}


IMAGES = [_image("f1", ["coi", "coi-old"]), _image("f2", ["foreign"], kind=False), _image("f3", [], kind=False),
          _image("f4", [])]


@pytest.mark.parametrize("all_, prefix, rows", [
    (False, None, [("coi", "f1"), ("coi-old", "f1")]),  # coi-built only; an unnamed one has no row
    (True, None, [("coi", "f1"), ("coi-old", "f1"), ("foreign", "f2"), ("", "f3"), ("", "f4")]),
    (True, "coi-", [("coi-old", "f1")]),
    (True, "fo", [("foreign", "f2")]),
    (False, "fo", []),
    (True, "nothing", []),
])
def test_image_rows(all_, prefix, rows):
    got = manage.image_rows(IMAGES, all=all_, prefix=prefix)
    assert [(r.alias, r.fingerprint) for r in got] == rows


def test_image_row_fields_and_json():
    row, = manage.image_rows([{"fingerprint": "f", "aliases": [{"name": "a"}], "size": None,
                               "properties": {"coi.kind": "custom", "os": "debian", "description": "d"}}],
                             all=False, prefix=None)
    assert (row.size, row.created, row.description) == (0, "", "d")
    assert row.to_json() == {"alias": "a", "fingerprint": "f", "size": 0, "created": "", "description": "d",
                             "coi.kind": "custom"}


@pytest.mark.parametrize("size, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 1024 ** 2, "5.0 MiB"),
    (3 * 1024 ** 3, "3.0 GiB"), (2048 * 1024 ** 3, "2048.0 GiB"),
])
def test_human_size(size, text):
    assert images.human_size(size) == text


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (187, "3m07s"),
                                           (3600, "60m00s")])
def test_elapsed(seconds, text):
    assert progress.elapsed(seconds) == text


@pytest.mark.parametrize("earlier, later", [
    ("2026-01-03T00:00:00.123456789Z", "2026-01-03T00:00:00.5Z"),
    ("2026-01-02T23:59:59Z", "2026-01-03T00:00:00Z"),
    ("2026-01-03T01:00:00+02:00", "2026-01-03T00:00:00Z"),
    ("garbage", "1970-01-01T00:00:01Z"),
])
def test_timestamp_orders(earlier, later):
    assert images.timestamp(earlier) < images.timestamp(later)


@pytest.mark.parametrize("a, b", [
    ("2026-01-03T01:00:00+01:00", "2026-01-03T00:00:00Z"),
    ("2026-01-03T00:00:00", "2026-01-03T00:00:00Z"),  # no zone: UTC
    ("2026-01-03T00:00:00.500Z", "2026-01-03T00:00:00.5Z"),
])
def test_timestamp_equal(a, b):
    assert images.timestamp(a) == images.timestamp(b)


@pytest.mark.parametrize("text", ["garbage", "", None, "2026-01-03"])
def test_timestamp_of_nonsense_is_zero(text):
    assert images.timestamp(text) == 0.0


def _row(alias, created):
    return images.ImageInfo(alias, alias + "-fp", 1, created, "", {})


ROWS = [_row("app-1", "2026-01-01T00:00:00Z"), _row("app-3", "2026-01-03T00:00:00.5Z"),
        _row("app-2", "2026-01-03T00:00:00.123456789Z"), _row("other", "2027-01-01T00:00:00Z"),
        _row("app-b", "2026-01-01T00:00:00Z")]


@pytest.mark.parametrize("prefix, keep, kept, deleted", [
    ("app-", 2, ["app-3", "app-2"], ["app-b", "app-1"]),  # same time: the later alias counts as newer
    ("app-", 1, ["app-3"], ["app-2", "app-b", "app-1"]),
    ("app-", 4, ["app-3", "app-2", "app-b", "app-1"], []),
    ("app-", 9, ["app-3", "app-2", "app-b", "app-1"], []),
    ("other", 1, ["other"], []),
    ("none-", 1, [], []),
])
def test_plan_cleanup(prefix, keep, kept, deleted):
    got_kept, got_deleted = images.plan_cleanup(ROWS, prefix=prefix, keep=keep)
    assert ([r.alias for r in got_kept], [r.alias for r in got_deleted]) == (kept, deleted)


@pytest.mark.parametrize("keep", [0, -1])
def test_plan_cleanup_refuses_keep_below_one(keep):
    with pytest.raises(UsageError, match="at least 1"):
        images.plan_cleanup([], prefix="x", keep=keep)


# --- the log file and the step lines ------------------------------------------------------


@pytest.mark.parametrize("alias, name", [
    ("coi", "build-coi.log"), ("team/app v2", "build-team_app_v2.log"), ("a.b-c_d", "build-a.b-c_d.log"),
])
def test_log_path(tmp_path, alias, name):
    config = SimpleNamespace(paths=SimpleNamespace(sessions_dir=str(tmp_path)))
    assert images.log_path(config, alias) == tmp_path / "logs" / name


def test_build_log_keeps_what_is_said_and_its_tail_leaves_notes_out(tmp_path):
    said: list[str] = []
    log = BuildLog(tmp_path / "logs" / "build-x.log", said.append)
    log.write("before open: dropped")
    log.open("# header")
    log.say("step 1")
    for i in range(20):
        log.write(f"out {i}")
    log.write("# a note")
    log.close()
    assert said == ["step 1"]
    assert log.path.read_text().splitlines()[:2] == ["# header", "step 1"]
    assert log.tail(3) == ["out 17", "out 18", "out 19"]
    assert BuildLog(tmp_path / "missing.log", said.append).tail(3) == []


def test_steps_are_numbered_with_the_time_so_far():
    said: list[str] = []
    steps = progress.Steps(3, said.append, started=time.monotonic())
    steps.begin("Launch")
    steps.begin("Run")
    assert said == ["[1/3] Launch  (0s elapsed)", "[2/3] Run  (0s elapsed)"]
    assert steps.current == "Run" and steps.number == 2


def test_steps_spinner_clears_its_line():
    lines: list[str] = []
    steps = progress.Steps(1, lambda s: None, progress=lines.append)
    with steps.spinner():
        pass
    assert lines[-1] == ""
    with progress.Steps(1, lambda s: None).spinner():  # no progress line: nothing to draw
        pass


# --- the builder's exec: its lost-PID policy -----------------------------------------------


class _Exec:
    """``exec_argv`` that gives local shell commands: Incus loses the first ``lost`` runs."""

    def __init__(self, lost: int, code: int = 0) -> None:
        self.lost, self.code, self.runs = lost, code, 0

    def exec_argv(self, name, command, **kw):
        self.runs += 1
        if self.runs <= self.lost:
            return ["sh", "-c", f"echo 'Error: {EXEC_NOT_STARTED}'; exit 255"]
        return ["sh", "-c", f"echo done; exit {self.code}"]


@pytest.mark.parametrize("idempotent, lost, code, runs, result", [
    (False, 0, 0, 1, 0),
    (False, 0, 7, 1, 7),
    (False, 1, 0, 1, 255),  # never run twice: the 255 fails the step
    (True, 0, 0, 1, 0),
    (True, 1, 0, 2, 0),
    (True, 2, 5, 3, 5),
    (True, 3, 0, 4, 0),  # asked again while lost, within coi's one window (incus.failures)
])
def test_run_in_builder_lost_pid_policy(idempotent, lost, code, runs, result):
    client = _Exec(lost, code)
    record: list[str] = []
    assert run.run_in_builder(client, "b", ["step"], record=record.append, idempotent=idempotent) == result
    assert client.runs == runs
    assert record.count("$ step") == runs


def test_run_in_builder_gives_up_after_the_window(monkeypatch):
    from coi.errors import TimedOutError
    from coi.incus import failures

    monkeypatch.setattr(failures, "LOST_RETRY_SECONDS", 0)
    client = _Exec(5, 0)
    with pytest.raises(TimedOutError):
        run.run_in_builder(client, "b", ["step"], record=lambda s: None, idempotent=True)
    assert client.runs == 1


def test_run_in_builder_a_255_without_the_marker_is_not_lost():
    client = _Exec(0, 255)
    assert run.run_in_builder(client, "b", ["x"], record=lambda s: None, idempotent=True) == 255
    assert client.runs == 1


def test_run_in_builder_streams_output_to_the_log_and_indented_to_output():
    record: list[str] = []
    output: list[str] = []
    run.run_in_builder(_Exec(0), "b", ["echo", "a b"], record=record.append, output=output.append)
    assert record == ["$ echo 'a b'", "done"]
    assert output == ["    done"]
