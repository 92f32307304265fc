"""Which containers coi acts on. Launched containers became coi's (issue 15); nothing a
workspace or an agent can write may make coi act on a container it did not create."""

from __future__ import annotations

from pathlib import Path

import pytest

from coi.config import default_config
from coi.sessions import manage, spec
from coi.sessions.lifecycle import Place
from fake_incus import FakeIncus

pytestmark = [pytest.mark.unit, pytest.mark.security]


class Quiet:
    def info(self, text: str) -> None: ...
    def detail(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...


@pytest.fixture
def place(tmp_path: Path, monkeypatch) -> Place:
    monkeypatch.setenv("COI_CONTAINER_PREFIX", "coi-test-")
    fake = FakeIncus()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return Place(client=fake, config=default_config(env={"HOME": str(tmp_path)}), workspace=tmp_path,
                 messages=Quiet(), state_dir=lambda: state)


# Foreign instances that look like coi's: the right name, marks with the wrong value,
# coi's other keys without the mark (what a user or another tool may have set).
FOREIGN = [
    {"user.coi.launched": "yes"},
    {"user.coi.launched": "True"},
    {"user.coi.image": "coi", "user.coi.slot": "1", "user.coi.persistent": "true"},
    {},
]


@pytest.mark.parametrize("config", FOREIGN)
def test_a_foreign_container_named_like_coi_s_is_never_acted_on(place, config):
    fake = place.client
    fake.create_instance("coi-test-1a2b3c4d-1", config=config, start=True)
    found, problems = manage.named(place, ["coi-test-1a2b3c4d-1"])
    assert found == [] and problems == ["coi-test-1a2b3c4d-1 is not a coi container"]
    assert manage.all_coi(place) == [] and manage.plan_clean(place, saved_sessions=False).stopped == []
    assert fake.exists("coi-test-1a2b3c4d-1") and not fake.called("delete")


def test_the_mark_comes_from_coi_s_launch_only(place, monkeypatch):
    """coi writes ``user.coi.launched`` through the API when it creates the container; the
    agent inside cannot change its instance's config, and no workspace key sets it."""
    from coi import config as coi_config
    from coi import network

    assert not [k for k in coi_config.WORKSPACE_KEYS if "launched" in k]
    monkeypatch.setattr(network, "pin_nic", lambda client, instances: None)
    monkeypatch.setattr(network, "applies_before_start", lambda *a: True)
    monkeypatch.setattr(network, "apply", lambda *a, **k: "nft")
    manage.launch(place, "coi-test-box", image="coi", ephemeral=False)
    created = place.client.called("create_instance")[0]
    assert created.kwargs["config"][spec.LAUNCHED] == "true"
    assert [i["name"] for i in manage.all_coi(place)] == ["coi-test-box"]


def test_bulk_commands_stay_inside_the_prefix(place):
    fake = place.client
    fake.create_instance("my-box", config=spec.launched_config("my-box", image="coi", ephemeral=False,
                                                               prefix="coi-test-"), start=True)
    assert manage.all_coi(place) == []  # --all never reaches it
    found, _ = manage.named(place, ["my-box"])
    assert [i["name"] for i in found] == ["my-box"]  # named, it is coi's
