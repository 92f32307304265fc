"""Branch sessions through the CLI, as a normal user against the real daemon and real git:
a copy per session, the work brought back as coi/NAME, reviewed and merged from the host."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def git(user, repo: Path, *args: str) -> str:
    proc = subprocess.run(user.argv(["git", *args]), cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def repo(session_user, workspace):
    """The workspace as a git repository of the test user, one commit on main."""
    home_config = session_user.home / ".gitconfig"
    home_config.write_text("[user]\n\tname = Host Person\n\temail = host@example.invalid\n")
    subprocess.run(["chown", f"{session_user.uid}:{session_user.gid}", str(home_config)], check=True)
    git(session_user, workspace, "init", "-q", "--initial-branch=main")
    (workspace / "README").write_text("hello\n")
    (workspace / "src").mkdir()
    (workspace / "src" / "app.py").write_text("print('v1')\n")
    subprocess.run(["chown", "-R", f"{session_user.uid}:{session_user.gid}", str(workspace)], check=True)
    git(session_user, workspace, "add", "-A")
    git(session_user, workspace, "commit", "-qm", "first")
    yield workspace
    home_config.unlink(missing_ok=True)


def coi_json(user, repo: Path, *args: str):
    proc = user.run([*args, "--format", "json"], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


AGENT_WORK = ("echo v2 > src/app.py && git commit -qam 'agent: v2' && echo notes > NOTES.md "
              "&& echo tmp >> README")


def test_run_on_a_branch_commits_are_brought_back_and_merged(session_user, repo):
    proc = session_user.run(["run", "--branch", "alpha", "--", "sh", "-c", AGENT_WORK], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "Branch: coi/alpha" in proc.stderr
    # The host's tree is untouched; the commit is there as coi/alpha.
    assert (repo / "src" / "app.py").read_text() == "print('v1')\n"
    assert git(session_user, repo, "status", "--porcelain") == ""
    assert git(session_user, repo, "log", "--format=%s", "coi/alpha").split("\n")[0] == "agent: v2"

    log = coi_json(session_user, repo, "log", "alpha")
    assert [c["subject"] for c in log["commits"]] == ["agent: v2"]
    diff = coi_json(session_user, repo, "diff", "alpha")
    assert {c["path"] for c in diff["committed"]} == {"src/app.py"}
    assert {(c["status"], c["path"]) for c in diff["uncommitted"]} == {("A", "NOTES.md"), ("M", "README")}
    assert "+notes" in diff["patch"] and "+v2" in diff["patch"]

    listed = coi_json(session_user, repo, "list")
    [entry] = [b for b in listed["branch_sessions"] if b["name"] == "alpha"]
    assert (entry["ahead"], entry["uncommitted"], entry["state"]) == (1, 2, "no container")

    merged = coi_json(session_user, repo, "merge", "alpha")
    assert (merged["outcome"], merged["commits"], merged["uncommitted_not_merged"]) == ("fast-forward", 1, 2)
    assert (repo / "src" / "app.py").read_text() == "v2\n"
    assert not (repo / "NOTES.md").exists()  # uncommitted work is not merged...
    assert "+notes" in coi_json(session_user, repo, "diff", "alpha")["patch"]  # ...and not lost

    discarded = coi_json(session_user, repo, "discard", "alpha", "--force")
    assert discarded["uncommitted"] == 2
    assert "coi/alpha" not in git(session_user, repo, "branch", "--list")
    assert coi_json(session_user, repo, "list")["branch_sessions"] == []


def test_ten_parallel_branch_runs_on_one_repository(session_user, repo):
    def one(i: int):
        # Not User.run: a recovered exit status (the Incus fault it skips on) is enough here.
        argv = session_user.argv(["coi", "run", "--branch", "--", "sh", "-c",
                                  f"echo {i} > agent-{i}.txt && git add . && git commit -qm 'agent {i}'"])
        return subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, range(10)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    branches = git(session_user, repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/coi/").split()
    assert len(branches) == 10
    subjects = sorted(git(session_user, repo, "log", "-1", "--format=%s", b).strip() for b in branches)
    assert subjects == sorted(f"agent {i}" for i in range(10))
    for b in branches:  # each branch holds its own agent's file only
        files = git(session_user, repo, "ls-tree", "--name-only", b).split()
        assert len([f for f in files if f.startswith("agent-")]) == 1
    assert git(session_user, repo, "status", "--porcelain") == ""
    assert sorted(p.name for p in repo.iterdir()) == [".git", "README", "src"]
    for b in branches:
        assert session_user.run(["discard", b, "--force"], cwd=repo).returncode == 0


def test_carry_brings_uncommitted_changes_and_merge_refuses_a_dirty_tree(session_user, repo):
    (repo / "README").write_text("hello, edited on the host\n")
    (repo / "draft.txt").write_text("draft\n")
    proc = session_user.run(["run", "--branch", "carried", "--carry", "--", "sh", "-c",
                             "cat README draft.txt && git status --porcelain && git add -A && "
                             "git commit -qm 'agent: took the draft'"], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "edited on the host" in proc.stdout and "draft" in proc.stdout
    assert " M README" in proc.stdout and "?? draft.txt" in proc.stdout
    # The host tree still has its own uncommitted changes: merge refuses and changes nothing.
    refused = session_user.run(["merge", "carried"], cwd=repo)
    assert refused.returncode == 1
    assert "uncommitted changes" in refused.stderr and "commit or stash" in refused.stderr
    assert git(session_user, repo, "rev-parse", "HEAD") == git(session_user, repo, "rev-parse", "main")
    assert (repo / "README").read_text() == "hello, edited on the host\n"


def test_merge_conflict_leaves_nothing_half_done(session_user, repo):
    proc = session_user.run(["run", "--branch", "clash", "--", "sh", "-c",
                             "echo agent > README && git commit -qam 'agent: readme'"], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    (repo / "README").write_text("host\n")
    git(session_user, repo, "commit", "-qam", "host: readme")
    head = git(session_user, repo, "rev-parse", "HEAD")
    for mode in ([], ["--squash"], ["--rebase"]):
        refused = session_user.run(["merge", "clash", *mode], cwd=repo)
        assert refused.returncode == 1, refused.stdout
        assert "conflicts in README" in refused.stderr and "nothing was changed" in refused.stderr
        assert git(session_user, repo, "rev-parse", "HEAD") == head
        assert git(session_user, repo, "status", "--porcelain") == ""
        assert (repo / "README").read_text() == "host\n"


@pytest.mark.parametrize("mode, outcome, commits_on_main", [
    ("--squash", "squashed", 2), ("--rebase", "rebased", 3)])
def test_squash_and_rebase(session_user, repo, mode, outcome, commits_on_main):
    proc = session_user.run(["run", "--branch", "work", "--", "sh", "-c",
                             "echo a > a && git add a && git commit -qm one && "
                             "echo b > b && git add b && git commit -qm two"], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    (repo / "host.txt").write_text("host\n")
    git(session_user, repo, "add", "host.txt")
    git(session_user, repo, "commit", "-qm", "host work")  # main moved on: no fast-forward
    merged = coi_json(session_user, repo, "merge", "work", mode)
    assert merged["outcome"] == outcome
    log = git(session_user, repo, "log", "--format=%s", "--first-parent", "main").split("\n")
    assert len([s for s in log if s]) == commits_on_main + 1  # + the first commit
    assert (repo / "a").exists() and (repo / "b").exists()


def test_errors_for_non_git_workspaces_and_unknown_branches(session_user, workspace):
    proc = session_user.run(["run", "--branch", "--", "true"], cwd=workspace)
    assert proc.returncode == 2
    assert "branch sessions need a git repository" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # the error and its hint
    proc = session_user.run(["diff", "nope"], cwd=workspace)
    assert proc.returncode == 1 and "no branch session nope" in proc.stderr
    proc = session_user.run(["run", "--branch", "Bad/Name", "--", "true"], cwd=workspace)
    assert proc.returncode == 2 and "not allowed" in proc.stderr
    proc = session_user.run(["run", "--carry", "--", "true"], cwd=workspace)
    assert proc.returncode == 2 and "--carry needs a branch session" in proc.stderr


def test_discard_asks_without_force_and_refuses_a_copy_in_use(session_user, repo):
    info = session_user.background(repo, "--branch", "busy")
    assert info["branch"] == "coi/busy"
    proc = session_user.run(["discard", "busy", "--force"], cwd=repo)
    assert proc.returncode == 1 and f"in use by container {info['container']}" in proc.stderr
    proc = session_user.run(["shell", "--background", "--branch", "busy"], cwd=repo)
    assert proc.returncode == 1 and "in use by container" in proc.stderr
    assert session_user.run(["kill", info["container"]], cwd=repo).returncode == 0
    proc = session_user.run(["discard", "busy"], cwd=repo)
    assert proc.returncode == 2 and "add --force" in proc.stderr  # no terminal: no question, no deletion
    assert coi_json(session_user, repo, "list")["branch_sessions"][0]["name"] == "busy"
    assert session_user.run(["discard", "busy", "--force"], cwd=repo).returncode == 0


def test_a_spare_copy_is_kept_ready_and_taken(session_user, repo):
    from conftest import wait_for_spares

    state = session_user.home / ".coi"
    assert session_user.run(["run", "--branch", "one", "--", "true"], cwd=repo).returncode == 0
    wait_for_spares(state)
    [spare] = list(state.glob("branches/*/.spare"))
    spare_inode = spare.stat().st_ino
    (repo / "later.txt").write_text("after the spare was made\n")
    subprocess.run(["chown", f"{session_user.uid}:{session_user.gid}", str(repo / "later.txt")], check=True)
    git(session_user, repo, "add", "later.txt")
    git(session_user, repo, "commit", "-qm", "host moved on")
    proc = session_user.run(["run", "--branch", "two", "--", "sh", "-c", "cat later.txt && git status --porcelain "
                             "&& git log -1 --format=%s"], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    # The spare (made before the host's last commit) became the copy, brought up to HEAD.
    assert proc.stdout == "after the spare was made\nhost moved on\n"
    [copy] = list(state.glob("branches/*/two"))
    assert copy.stat().st_ino == spare_inode
    wait_for_spares(state)
    assert list(state.glob("branches/*/.spare"))  # and a new one is ready
    for name in ("one", "two"):
        assert session_user.run(["discard", name, "--force"], cwd=repo).returncode == 0


def test_full_flow_through_a_terminal_detach_diff_merge_and_resume(session_user, repo, incus):
    from terminal import Terminal

    term = Terminal(session_user.argv(["coi", "shell", "--branch", "feature"], env={"TERM": "xterm-256color"}),
                    cwd=str(repo))
    term.wait_for("fake-claude> ")
    assert "Branch: coi/feature" in term.output()
    name = next(line.split(": ", 1)[1].strip() for line in term.output().splitlines()
                if line.startswith("Container: "))
    term.type("remember the branch")
    term.wait_for("echo: remember the branch")
    term.type("exit")  # the agent exits: bash is left, in the copy
    term.wait_for("code@")
    term.type("echo v2 > src/app.py && git commit -qam 'agent: v2' && echo wip > wip.txt && echo DONE-$((6*7))")
    term.wait_for("DONE-42")
    term.detach()
    assert term.finish() == 0
    assert incus.instance(name)["status"] == "Running"

    listed = coi_json(session_user, repo, "list")
    [container] = [c for c in listed["active_containers"] if c["name"] == name]
    assert container["branch"] == "coi/feature"
    [entry] = listed["branch_sessions"]
    assert (entry["ahead"], entry["uncommitted"], entry["state"], entry["container"]) == (1, 1, "Running", name)
    text = session_user.run(["diff", "feature"], cwd=repo)
    assert text.returncode == 0 and "+v2" in text.stdout and "+wip" in text.stdout
    assert "\x1b" not in text.stdout  # not a terminal: no colours
    log = session_user.run(["log"], cwd=repo)  # the workspace's only branch session
    assert log.returncode == 0 and "agent: v2" in log.stdout
    merged = coi_json(session_user, repo, "merge", "feature")
    assert merged["outcome"] == "fast-forward" and merged["into"] == "main"
    assert (repo / "src" / "app.py").read_text() == "v2\n" and not (repo / "wip.txt").exists()

    # The session ends; its copy (with the uncommitted file) stays, and --resume continues on it.
    assert session_user.run(["shutdown", name], cwd=repo).returncode == 0
    term = Terminal(session_user.argv(["coi", "shell", "--branch", "feature", "--resume"],
                                      env={"TERM": "xterm-256color"}), cwd=str(repo))
    term.wait_for("fake-claude> ")
    assert "Continuing on branch coi/feature" in term.output()
    assert "remembering: remember the branch" in term.text()
    term.type("exit")
    term.wait_for("code@")
    term.type("cat wip.txt; git --no-pager log -1 --format=%s")
    term.wait_for("agent: v2")
    assert "wip" in term.text()
    term.type("sudo poweroff")
    term.wait_for("Session data saved", timeout=90)
    assert term.finish() == 0
    assert session_user.run(["discard", "feature", "--force"], cwd=repo).returncode == 0


@pytest.mark.security
def test_the_host_repository_is_out_of_the_agents_reach(session_user, repo):
    """In a branch session the host's tree is not mounted and its objects are read-only,
    also for the container's root."""
    before = git(session_user, repo, "count-objects", "-v")
    script = ("for who in '' sudo; do $who touch /.coi-repo/objects/planted 2>/dev/null && echo WROTE; "
              "$who mount -o remount,rw /.coi-repo/objects 2>/dev/null && echo REMOUNTED; done; "
              "ls -a /workspace | tr '\\n' ' '; grep -c ' /workspace ' /proc/mounts")
    proc = session_user.run(["run", "--branch", "--", "sh", "-c", script], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "WROTE" not in proc.stdout and "REMOUNTED" not in proc.stdout
    assert not (repo / ".git" / "objects" / "planted").exists()
    assert git(session_user, repo, "count-objects", "-v") == before
    assert proc.stdout.split()[:5] == [".", "..", ".git", "README", "src"]
    name = next(line.split("coi/", 1)[1].split()[0] for line in proc.stderr.splitlines() if line.startswith("Branch:"))
    assert session_user.run(["discard", name, "--force"], cwd=repo).returncode == 0


def test_discard_names_what_root_in_the_container_left_behind(session_user, repo):
    proc = session_user.run(["run", "--branch", "rooted", "--", "sh", "-c",
                             "sudo mkdir -p /workspace/build/out && sudo touch /workspace/build/out/f"], cwd=repo)
    assert proc.returncode == 0, proc.stderr
    [copy] = list((session_user.home / ".coi").glob("branches/*/rooted"))
    owner = (copy / "build").stat().st_uid
    if owner == session_user.uid:
        pytest.skip("root in the container writes as the host user here (idmapped mount)")
    refused = session_user.run(["discard", "rooted", "--force"], cwd=repo)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"sudo rm -rf {copy}" in refused.stderr
    subprocess.run(["rm", "-rf", str(copy)], check=True)  # what the hint says, as root
    assert session_user.run(["discard", "rooted", "--force"], cwd=repo).returncode == 0
    assert "coi/rooted" not in git(session_user, repo, "branch", "--list")
