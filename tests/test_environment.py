"""synthunlearn.environment: the record of what a measurement ran on."""

import subprocess

import pytest
import torch

from synthunlearn import environment


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A one-commit repository standing in for the checkout the package was imported from."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(environment, "_CHECKOUT", repo.resolve())
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return repo, head


def test_commit_is_head_and_dirty_only_for_changed_tracked_files(checkout):
    repo, head = checkout
    assert environment.git_commit() == head
    (repo / "notes.txt").write_text("untracked files do not change what ran\n")
    assert environment.git_commit() == head
    (repo / "a.py").write_text("x = 2\n")
    assert environment.git_commit() == head + "-dirty"


def test_no_commit_for_a_copy_inside_another_checkout(checkout, tmp_path, monkeypatch):
    # An installed copy under the checkout's .venv must not claim the checkout's commit.
    repo, _ = checkout
    inner = repo / ".venv" / "lib" / "site-packages"
    inner.mkdir(parents=True)
    monkeypatch.setattr(environment, "_CHECKOUT", inner.resolve())
    assert environment.git_commit() is None
    outside = tmp_path / "not_a_checkout"
    outside.mkdir()
    monkeypatch.setattr(environment, "_CHECKOUT", outside.resolve())
    assert environment.git_commit() is None


def test_describe_names_versions_and_machine():
    env = environment.describe()
    assert env["packages"]["torch"] == torch.__version__
    assert set(env["packages"]) == set(environment.PACKAGES)
    assert env["cpus"] >= 1 and env["python"].count(".") == 2
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment.package_versions(["torch", "no-such-package-xyz"]) == {
        "torch": torch.__version__, "no-such-package-xyz": None}


def test_summary_and_grouping():
    env = {"commit": "0123456789abcdef" * 2 + "01234567-dirty", "cpu": "Some CPU", "cpu_capability": "AVX2",
           "cpus": 2, "gpu": None,
           "packages": {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": None, "numpy": "2.4.6"}}
    assert environment.summary(env) == (
        "commit 0123456789ab-dirty; torch 2.13.0, deepspeed 0.19.8, numpy 2.4.6; Some CPU AVX2, 2 CPUs")
    other = dict(env, commit="f" * 40)
    groups = environment.group_by_environment([("base", env), ("cpt", other), ("sft", env), ("old", None)])
    assert groups == [{"environment": env, "phases": ["base", "sft"]},
                      {"environment": other, "phases": ["cpt"]},
                      {"environment": None, "phases": ["old"]}]


def test_describe_reads_the_commit_on_every_call(checkout):
    # A sweep stamps each phase with the checkout's state when that phase starts.
    repo, head = checkout
    assert environment.describe()["commit"] == head
    (repo / "a.py").write_text("x = 3\n")
    assert environment.describe()["commit"] == head + "-dirty"
