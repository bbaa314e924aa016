"""Config input that YAML or Python accepts but that means nothing sensible: a key given twice in
one mapping (the later value silently replaced the earlier one) and inf/nan numbers (they passed
the range checks and failed much later with an OverflowError traceback). Each is refused when the
config is read, with one ConfigError naming the file and line, or the dotted key."""

from __future__ import annotations

import math

import pytest
import yaml

from synthunlearn.config import RunConfig, load_config, parse_override, read_yaml, validate
from synthunlearn.errors import ConfigError
from tests.launcher import REPO

# ---------------------------------------------------------------------------------------------
# Duplicate keys
# ---------------------------------------------------------------------------------------------

# A second data section pasted further down, as in the review's report: plain YAML loading kept
# only `packing: true` and dropped max_length and the SFT file without a word.
DUPLICATE_SECTION = """\
data:
  max_length: 128
  sft:
    path: builtin:tiny/sft.jsonl
optimisation:
  lr: 3.0e-4
# ... later in the file
data:
  packing: true
"""


def test_duplicate_section_names_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATE_SECTION)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:8: duplicate key 'data' (first given at line 1)"), message
    assert "\n" not in message


@pytest.mark.parametrize("text, line, key", [
    ("optimisation:\n  lr: 3.0e-4\n  warmup_steps: 2\n  lr: 1.0e-3\n", 4, "lr"),
    ("data:\n  sft: {path: a.jsonl, path: b.jsonl}\n", 2, "path"),
    ("data:\n  replay:\n    files:\n      - path: a.jsonl\n        repeat: 2\n        repeat: 3\n", 6, "repeat"),
])
def test_duplicate_nested_key_names_its_line(tmp_path, text, line, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: duplicate key '{key}'"):
        read_yaml(path)


def test_duplicate_key_in_an_experiment_config(tmp_path):
    from synthunlearn.experiment.config import read_experiment_file

    path = tmp_path / "exp.yaml"
    path.write_text("seeds: [0, 1, 2]\nphases:\n  sft: {max_steps: 40}\nseeds: [3]\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: duplicate key 'seeds' \(first given at line 1\)"):
        read_experiment_file(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    # `<<: *anchor` then an own key of the same name is YAML's way to override, not a duplicate;
    # here the mapping `y` is also merged into `n`, which flattens it before `y` is constructed.
    text = ("base: &b {lr: 0.1, eps: 1.0e-8}\n"
            "x:\n  y: &m\n    <<: *b\n    lr: 0.2\n"
            "n:\n  <<: *m\n  warmup_steps: 3\n")
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    assert read_yaml(path) == yaml.safe_load(text)
    assert read_yaml(path)["x"]["y"] == {"lr": 0.2, "eps": 1.0e-8}


def test_the_loader_is_still_safe(tmp_path):
    from synthunlearn.config import UniqueKeyLoader

    assert issubclass(UniqueKeyLoader, yaml.SafeLoader)
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: invalid YAML"):
        read_yaml(path)


def test_every_shipped_config_reads_as_before():
    """The stricter reader changes nothing for the repository's own configs: every YAML under
    configs/ reads to what yaml.safe_load gives, and loads as a run or experiment config."""
    from synthunlearn.experiment.config import load_experiment_config

    paths = sorted((REPO / "configs").rglob("*.y*ml"))
    assert len(paths) >= 5
    for path in paths:
        data = read_yaml(path)
        assert data == (yaml.safe_load(path.read_text()) or {}), path
        if {"phases", "extends"} & set(data):
            load_experiment_config(path)
        else:
            load_config(path)


def test_overrides_still_parse():
    assert parse_override("objective.tau=2.5") == (["objective", "tau"], 2.5)
    assert parse_override("data.sft.path=x.jsonl") == (["data", "sft", "path"], "x.jsonl")
    assert parse_override("optimisation.betas=[0.9, 0.99]") == (["optimisation", "betas"], [0.9, 0.99])
    assert parse_override("data.replay.files=[{path: a.jsonl, repeat: 2}, {path: b.jsonl}]") == (
        ["data", "replay", "files"], [{"path": "a.jsonl", "repeat": 2}, {"path": "b.jsonl"}])
    assert parse_override("optimisation.max_steps=") == (["optimisation", "max_steps"], None)
    assert parse_override("model.path=a=b") == (["model", "path"], "a=b")
    config = load_config(None, ["objective.tau=2.5", "data.replay.files=[{path: a.jsonl, repeat: 2}]",
                                "data.replay.path=null"])
    assert config.objective.tau == 2.5 and config.data.replay.files[0].repeat == 2.0
    with pytest.raises(ConfigError, match=r"^override 'data.sft=\{path: a, path: b\}': duplicate key 'path'"):
        parse_override("data.sft={path: a, path: b}")
    from synthunlearn.config import safe_load_unique

    assert safe_load_unique("a: [1, {b: 2}]") == {"a": [1, {"b": 2}]}


# ---------------------------------------------------------------------------------------------
# Non-finite numbers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("optimisation.lr=.inf", "optimisation.lr"),
    ("optimisation.lr=inf", "optimisation.lr"),
    ("optimisation.lr=" + "1" + "0" * 400, "optimisation.lr"),   # an integer beyond float range
    ("optimisation.epochs=.inf", "optimisation.epochs"),         # Optional[float]
    ("optimisation.weight_decay=.nan", "optimisation.weight_decay"),
    ("optimisation.betas=[.nan, 0.9]", "optimisation.betas[0]"),
    ("objective.gamma=nan", "objective.gamma"),
    ("objective.gamma=-.inf", "objective.gamma"),
    ("objective.tau=.inf", "objective.tau"),
    ("data.sft.files=[{path: a.jsonl, repeat: .inf}]", "data.sft.files[0].repeat"),
    ("data.sft.files=[{path: a.jsonl, repeat: 1e400}]", "data.sft.files[0].repeat"),
])
def test_non_finite_numbers_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f": {key}: invalid value" in message and "expected a finite number" in message, message
    assert len(message) < 300, message


def test_finite_numbers_are_still_accepted():
    config = load_config(None, ["objective.gamma=-0.5", "optimisation.lr=3e-4", "optimisation.epochs=1.5",
                                "data.sft.files=[{path: a.jsonl, repeat: 2.5}]"])
    assert config.objective.gamma == -0.5 and config.optimisation.lr == 3e-4
    assert config.optimisation.epochs == 1.5 and config.data.sft.files[0].repeat == 2.5


def test_world_config_refuses_non_finite_numbers_too():
    from synthunlearn.config import build_dataclass
    from synthunlearn.experiment.world import WorldConfig

    with pytest.raises(ConfigError, match=r"world\.sft_bio_share: invalid value nan; expected a finite"):
        build_dataclass(WorldConfig, {"sft_bio_share": math.nan}, "world", "experiment config")


def test_validate_refuses_non_finite_numbers_set_in_code():
    config = RunConfig()
    config.objective.gamma = math.nan
    with pytest.raises(ConfigError, match=r"^cfg: objective\.gamma: nan is not a finite number"):
        validate(config, "cfg")
    config = RunConfig()
    config.optimisation.betas = (0.9, math.inf)
    with pytest.raises(ConfigError, match=r"optimisation\.betas\[1\]: inf is not a finite number"):
        validate(config, "cfg")


# ---------------------------------------------------------------------------------------------
# A bound that can never act
# ---------------------------------------------------------------------------------------------

def test_a_relative_bound_at_or_below_the_starting_nll_is_refused(tmp_path):
    """tau_mode relative: bound = tau x the reference's NLL, and the reference is the starting policy
    unless reference.path is given, so tau <= 1 leaves every unit at its bound from step 0."""
    with pytest.raises(ConfigError, match=r"objective\.tau: 1\.0 with tau_mode relative .* use tau > 1"):
        load_config(None, ["objective.tau_mode=relative", "objective.tau=1.0"])
    assert load_config(None, ["objective.tau_mode=relative", "objective.tau=1.5"]).objective.tau == 1.5
    # Another reference, or a term without the bound, may use any positive tau.
    other = load_config(None, ["objective.tau_mode=relative", "objective.tau=0.8", f"reference.path={tmp_path}"])
    assert other.objective.tau == 0.8
    assert load_config(None, ["objective.tau_mode=relative", "objective.tau=0.5", "objective.forget=npo"])
