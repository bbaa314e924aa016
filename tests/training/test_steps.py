"""How long a run is: ``optimisation.max_steps`` and ``optimisation.epochs``."""

import logging

import pytest

from synthunlearn.config import load_config
from synthunlearn.errors import ConfigError
from synthunlearn.training.trainer import resolve_total_steps


def _steps(config, examples=40, global_batch=8):
    return resolve_total_steps(config, examples, global_batch)


def test_default_is_100_steps():
    assert _steps(load_config(None)) == 100


def test_epochs_alone_train_by_epochs(tmp_path):
    # 3 epochs of 40 examples at 8 per step: 15 steps (the default 100 must not win silently).
    assert _steps(load_config(None, ["optimisation.epochs=3"])) == 15
    config = tmp_path / "run.yaml"
    config.write_text("optimisation:\n  epochs: 2.5\n")
    assert _steps(load_config(config)) == 13


def test_both_given_max_steps_decides_and_says_so(tmp_path, caplog):
    config = tmp_path / "run.yaml"
    config.write_text("optimisation:\n  epochs: 3\n")
    with caplog.at_level(logging.WARNING):
        assert _steps(load_config(config, ["optimisation.max_steps=7"])) == 7
    assert "max_steps decides" in caplog.text


def test_neither_is_an_error():
    with pytest.raises(ConfigError, match="optimisation.max_steps: set max_steps or optimisation.epochs"):
        load_config(None, ["optimisation.max_steps=null"])
