"""The twotower command line, end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from twotower.cli import build_parser, main, run_synthetic


def test_synthetic_learns_something(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        [
            "synthetic",
            "--num-users",
            "300",
            "--num-items",
            "200",
            "--interactions-per-user",
            "30",
            "--epochs",
            "4",
            "--batch-size",
            "256",
        ]
    )
    results = run_synthetic(args)
    out = capsys.readouterr().out
    assert "factorized_top_k/top_10_categorical_accuracy" in out
    untrained = results["untrained"]["factorized_top_k/top_10_categorical_accuracy"]
    trained = results["trained"]["factorized_top_k/top_10_categorical_accuracy"]
    # 200 items: a random ranking hits the top 10 about 5% of the time; the generated structure allows far more.
    assert untrained < 0.09
    assert trained > untrained + 0.05


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["synthetic", "--epochs", "0"], "expected a positive integer"),
        (["synthetic", "--learning-rate", "abc"], "expected a positive number"),
        (["synthetic", "--bogus"], "unrecognized arguments"),
        (["quickstart", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
        (["nothing"], "invalid choice"),
    ],
)
def test_bad_flags_exit_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_help_lists_every_flag() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "twotower.cli", "synthetic", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--num-users",
        "--num-items",
        "--interactions-per-user",
        "--dim",
        "--epochs",
        "--batch-size",
        "--learning-rate",
        "--seed",
    ):
        assert flag in help_text
