"""The launchers' command-line contract."""

from synthunlearn.cli import parse_args


def test_flags_become_overrides_and_may_follow_them():
    args = parse_args("unlearn", ["--output-dir", "o", "objective.tau=2", "--max-steps", "7", "--seed", "3",
                                  "data.forget.path=x.jsonl", "--save-steps", "2", "--local_rank=1"])
    assert args.output_dir == "o" and args.local_rank == 1
    assert args.overrides == ["objective.tau=2", "data.forget.path=x.jsonl", "optimisation.max_steps=7",
                              "checkpointing.save_steps=2", "optimisation.seed=3"]


def test_defaults_are_the_embedded_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args("sft", [])
    assert args.config.endswith("configs/tiny/sft.yaml")
    assert args.deepspeed_config.endswith("configs/deepspeed/zero2.json")
    from pathlib import Path
    assert Path(args.config).is_file() and Path(args.deepspeed_config).is_file()


def test_help_shows_the_real_default_output_dir():
    # The help text once said "runs/launch/sft.py": %(prog)s expands to the program path.
    from synthunlearn.cli import build_parser

    for job in ("sft", "unlearn"):
        text = " ".join(build_parser(job).format_help().split())
        assert f"final/ go (default: runs/{job})" in text, text
        assert build_parser(job).parse_args([]).output_dir == f"runs/{job}"
