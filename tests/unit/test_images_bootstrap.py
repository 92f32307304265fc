"""The local Debian bases (coi.images.bootstrap): references, the host's mirror, the
inputs that decide a rebuild, and the image metadata."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from coi import images
from coi.errors import CoiError
from coi.images import bootstrap

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("ref, suite", [("bootstrap:debian/bookworm", "bookworm"),
                                        ("bootstrap:debian/trixie", "trixie")])
def test_bootstrap_parse_base(ref, suite):
    assert bootstrap.parse_base(ref) == suite
    assert images.alias_for(suite) == f"coi-base-debian-{suite}"


@pytest.mark.parametrize("ref", ["bootstrap:debian/sid", "bootstrap:debian/", "debian/trixie", ""])
def test_bootstrap_parse_base_refuses(ref):
    with pytest.raises(CoiError, match="unknown bootstrap base"):
        bootstrap.parse_base(ref)


@pytest.mark.parametrize("files, mirror", [
    ({}, "http://deb.debian.org/debian"),
    ({"sources.list": "deb http://ftp.de.debian.org/debian bookworm main\n"}, "http://ftp.de.debian.org/debian"),
    ({"sources.list": "deb [arch=amd64] http://m/debian bookworm main\n"}, "http://m/debian"),
    ({"sources.list": "deb http://security.debian.org/ bookworm-security main\n"
                      "deb http://m/debian bookworm main\n"}, "http://m/debian"),
    ({"sources.list.d/debian.sources": "Types: deb\nURIs: http://d/debian\nSuites: trixie\n",
      "sources.list": "deb http://m/debian bookworm main\n"}, "http://d/debian"),
    ({"sources.list.d/a.sources": "URIs: http://deb.debian.org/debian-security\n",
      "sources.list.d/b.sources": "URIs: http://b/debian\n"}, "http://b/debian"),
])
def test_host_debian_mirror(tmp_path, files, mirror):
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert images.host_debian_mirror(tmp_path) == mirror


@pytest.mark.parametrize("change", [{"suite": "trixie"}, {"mirror": "http://other/debian"}])
def test_bootstrap_inputs_hash_follows(change):
    given = {"suite": "bookworm", "mirror": "http://m/debian"}
    assert bootstrap.inputs_hash(**{**given, **change}) != bootstrap.inputs_hash(**given)


@pytest.mark.parametrize("value", ["Debian trixie (coi bootstrap)", 'a "quoted" value', "it's", "back\\slash"])
def test_bootstrap_metadata_quotes_property_values(value):
    data = bootstrap._metadata_tar("trixie", {"description": value, "os": "debian"})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        yaml = tar.extractfile("metadata.yaml").read().decode()
    assert names == ["metadata.yaml", "templates/hostname.tpl", "templates/hosts.tpl"]
    lines = yaml.splitlines()
    assert lines[2] == "properties:" and lines[4] == '  os: "debian"'
    assert json.loads(lines[3].removeprefix("  description: ")) == value  # a YAML double-quoted string


def test_ensure_base_reuses_an_image_whose_inputs_are_unchanged(monkeypatch):
    monkeypatch.setattr(bootstrap, "host_debian_mirror", lambda: "http://m/debian")
    digest = bootstrap.inputs_hash("trixie", "http://m/debian")

    class Client:
        def image_by_alias(self, alias):
            assert alias == "coi-base-debian-trixie"
            return {"properties": {"coi.inputs": digest}}

    said: list[str] = []
    assert images.ensure_base(Client(), "trixie", log=said.append) == "coi-base-debian-trixie"
    assert said == []
