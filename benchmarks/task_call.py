"""Cost of one Retrieval call (forward + backward) with string candidate ids, this tree against another.

    python benchmarks/task_call.py --baseline-src /path/to/old/checkout/src [--rounds 5]

Each round runs the measurement once per tree in a child process, alternating (A, B, A, B, ...), so that both
trees see the same machine load; the table gives each tree's median milliseconds per call and the median, min and
max of the per-round ratio. Cases: B = 4096 string ids with accidental-hit removal (the ids are encoded once per
call now, up to six times before), the same with a factorized metric ranking a 4,096-title corpus, and integer
ids. Without --baseline-src it times this tree only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("strings", "strings+metric", "integers")


def measure(case: str, batch: int, repeats: int) -> float:
    """Best milliseconds of one forward + backward of the task in ``case`` (runs inside a child)."""
    import numpy as np
    import torch

    from twotower import BruteForce, FactorizedTopK, Retrieval

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    queries = torch.tensor(rng.normal(size=(batch, 64)), dtype=torch.float32, requires_grad=True)
    candidates = torch.tensor(rng.normal(size=(batch, 64)), dtype=torch.float32, requires_grad=True)
    titles = np.array([f"movie title number {i}" for i in range(4096)])
    picked = rng.integers(0, 4096, size=batch)
    ids = titles[picked] if case != "integers" else torch.as_tensor(picked)
    metrics = None
    if case == "strings+metric":
        metrics = FactorizedTopK(BruteForce(k=100).index(torch.randn(4096, 64), titles), ks=(1, 10, 100))
    task = Retrieval(metrics=metrics, remove_accidental_hits=True)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        task(queries, candidates, candidate_ids=ids).backward()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _child(src: str, case: str, batch: int, repeats: int) -> float:
    environment = {**os.environ, "PYTHONPATH": src}
    command = [sys.executable, __file__, "--child", case, "--batch", str(batch), "--repeats", str(repeats)]
    output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
    return float(json.loads(output.strip().splitlines()[-1])["ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", help="the src/ folder of the tree to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"ms": measure(args.child, args.batch, args.repeats)}))
        return
    here = str(Path(__file__).resolve().parents[1] / "src")
    print(f"Retrieval forward + backward, B = {args.batch}, D = 64, 2 threads, best of {args.repeats} per child")
    print("| case | this tree (ms, median) | baseline (ms, median) | speed-up median | min | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in CASES:
        mine, theirs, ratios = [], [], []
        for _ in range(args.rounds):
            mine.append(_child(here, case, args.batch, args.repeats))
            if args.baseline_src:
                theirs.append(_child(args.baseline_src, case, args.batch, args.repeats))
                ratios.append(theirs[-1] / mine[-1])
        if ratios:
            print(f"| {case} | {statistics.median(mine):.1f} | {statistics.median(theirs):.1f} | "
                  f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}x | {max(ratios):.2f}x |")  # fmt: skip
        else:
            print(f"| {case} | {statistics.median(mine):.1f} | | | | |")


if __name__ == "__main__":
    main()
