"""Atomic files and directories: a writer killed at any instant never costs the reader the saved work."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from save_worker import variant
from twotower._files import atomic_write, read_verified_directory, remove_stale_temporaries
from twotower.pipeline import save_run
from twotower.pipeline.runs import RunDirectoryError as RunError
from twotower.pipeline.runs import load_pipeline_run


def _saved_seed(directory: Path) -> int:
    """The seed of the run in ``directory``, after checking that its weights are that variant's, whole."""
    run = load_pipeline_run(directory)
    seed = run.config.seed
    expected = variant(seed).model
    for name, tensor in expected.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], tensor), f"seed {seed}: {name} is another run's"
    return seed


def test_killing_save_run_never_loses_the_run(tmp_path: Path) -> None:
    """SIGKILL at 20 random points of a save that replaces a run: every time, the directory holds a whole run,
    the previous one or the new one; the temporaries of killed writers are cleaned by the next save."""
    directory = tmp_path / "quickstart"
    save_run(directory, variant(0))
    started = time.perf_counter()
    save_run(directory, variant(0), overwrite=True)
    duration = time.perf_counter() - started
    rng = random.Random(7)
    seen_seeds: dict[int, int] = {}
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "save_worker.py"), str(directory)],
            stdout=subprocess.PIPE,
            env=environment,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        # A random instant inside the child's first or second save (the second replaces the child's first).
        target = rng.choice([0, 1])
        while child.stdout.readline().strip() != f"start {target}".encode():
            pass
        time.sleep(rng.uniform(0.0, duration))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        seed = _saved_seed(directory)
        seen_seeds[seed] = seen_seeds.get(seed, 0) + 1
    found = dict(sorted(seen_seeds.items()))
    print(f"20 SIGKILLs during save_run, 20 loads of a whole run; runs found, by seed: {found}")
    assert set(seen_seeds) - {0}, seen_seeds  # some kills came after the child's first save had replaced the run
    save_run(directory, variant(3), overwrite=True)
    assert _saved_seed(directory) == 3
    leftovers = [entry.name for entry in tmp_path.iterdir() if entry.name != "quickstart"]
    assert leftovers == []
    assert [entry.name for entry in directory.iterdir() if entry.name.startswith(".")] == []


def test_save_run_refuses_to_replace_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a twotower run"):
        save_run(directory, variant(0), overwrite=True)
    assert (directory / "notes.txt").read_text() == "precious"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".index.safetensors.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".index.safetensors.{os.getpid()}.def456.tmp"
    live.write_bytes(b"y")
    other = tmp_path / f".other.{dead.pid}.abc.tmp"
    other.write_bytes(b"z")
    atomic_write(tmp_path / "index.safetensors", b"payload")
    assert not stale.exists()
    assert live.exists()  # this process is alive: its temporary may be in use
    assert other.exists()  # another target's
    assert (tmp_path / "index.safetensors").read_bytes() == b"payload"
    assert remove_stale_temporaries(tmp_path, "other") == 1


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b'{"format": "twotower.run/1"}', "no 'files' mapping"),
        (b"\xff\xfe not utf-8", "not UTF-8 text"),
        (b'{"format": "twotower.run/1", "files": ', "not valid JSON"),
        (b'{"format": "twotower.run/1", "files": {"a": NaN}}', "not valid JSON"),
        (b'{"format": "twotower.run/1", "files": {"../escape": "' + b"0" * 64 + b'"}}', "not a file name inside"),
        (b'{"format": "twotower.run/1", "files": {"/etc/passwd": "' + b"0" * 64 + b'"}}', "not a file name inside"),
        (b'{"format": "twotower.run/1", "files": {"a": 5}}', "not 64 hexadecimal digits"),
    ],
)
def test_malformed_manifests_are_refused_by_name(tmp_path: Path, manifest: bytes, message: str) -> None:
    (tmp_path / "manifest.json").write_bytes(manifest)
    with pytest.raises(RunError, match=message):
        read_verified_directory(tmp_path, "twotower.run/1", RunError, "run", exclusive=False)
