"""Reading a large interaction log: twotower's read + vocabulary + split against pandas' read_parquet + factorize.

A generated Parquet log (power-law item popularity, users of varied activity, timestamps over a year; written in
chunks of 2M rows, so generating it never holds the whole log) is read by each side in its own process,
interleaved (twotower, pandas, pandas, twotower, ...), and each process reports its wall time (imports excluded)
and its peak RSS (imports included). The log is in time order, as a log written as it happened is (twotower's
time split then finds its cut by bisection); ``--order shuffled`` shuffles each chunk's rows, so that the split
takes its general path (a histogram for the quantile and masks).

* twotower: ``Interactions.from_parquet`` (ids encoded row group by row group, times checked, duplicates
  counted), ``split_interactions`` (global time cut: latest 10% test, 10% of the rest validation) and
  ``prepare_interactions`` (user and item vocabularies fitted on the training rows, item counts, every user's
  seen items).
* pandas: ``read_parquet`` of the same three columns, ``factorize`` of both id columns, and the same time cut as
  boolean masks: less than twotower does (no duplicate count, no vocabularies of the training rows only).

    python benchmarks/ingest.py                    # 50M interactions, 5M users, 1M items, 3 rounds
    python benchmarks/ingest.py --rows 5000000 --users 500000 --items 100000 --rounds 3
    python benchmarks/ingest.py --order shuffled    # the same log, each chunk's rows shuffled
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(
    path: Path, rows: int, users: int, items: int, seed: int, shuffled: bool = False, chunk: int = 2_000_000
) -> None:
    """Write the log in chunks of ``chunk`` rows: columns user_id (int64), item_id (int64), ts (int64 seconds),
    in time order, or with each chunk's rows shuffled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    # Item popularity ~ 1 / rank^0.9, user activity ~ 1 / rank^0.5, both over shuffled ids.
    item_cdf = np.cumsum(1.0 / np.arange(1, items + 1) ** 0.9)
    item_cdf /= item_cdf[-1]
    user_cdf = np.cumsum(1.0 / np.arange(1, users + 1) ** 0.5)
    user_cdf /= user_cdf[-1]
    item_ids = rng.permutation(items).astype(np.int64) * 7 + 1_000_003  # sparse, wide integer ids
    user_ids = rng.permutation(users).astype(np.int64) + 10_000_000_000
    start = 1_600_000_000
    partial = path.with_name(path.name + ".partial")
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64())])
    with pq.ParquetWriter(partial, schema) as writer:
        for begin in range(0, rows, chunk):
            n = min(chunk, rows - begin)
            user = user_ids[np.searchsorted(user_cdf, rng.random(n))]
            item = item_ids[np.searchsorted(item_cdf, rng.random(n))]
            ts = start + np.sort(rng.integers(0, 365 * 86_400, n)) // max(1, rows // n)
            ts += (begin * 365 * 86_400) // rows
            if shuffled:
                ts = ts[rng.permutation(n)]
            writer.write_table(pa.table({"user_id": user, "item_id": item, "ts": ts}, schema=schema))
    os.replace(partial, path)


def measure_twotower(path: Path) -> dict[str, float]:
    from twotower.data import Interactions, split_interactions
    from twotower.pipeline import prepare_interactions

    log = Interactions.from_parquet(path, "user_id", "item_id", time_col="ts")
    split = split_interactions(log, "time", test_fraction=0.1, validation_fraction=0.1)
    prepared = prepare_interactions(log, split)
    return {"rows": float(len(log)), "users": float(len(prepared.users)), "items": float(len(prepared.items))}


def measure_pandas(path: Path) -> dict[str, float]:
    import pandas as pd

    frame = pd.read_parquet(path, columns=["user_id", "item_id", "ts"])
    user_codes, user_values = pd.factorize(frame["user_id"])
    item_codes, item_values = pd.factorize(frame["item_id"])
    times = frame["ts"].to_numpy()
    cut = np.quantile(times, 0.9, method="higher")
    test = times >= cut
    validation_cut = np.quantile(times[~test], 0.9, method="higher")
    validation = ~test & (times >= validation_cut)
    del user_codes, item_codes, validation
    return {"rows": float(len(frame)), "users": float(len(user_values)), "items": float(len(item_values))}


def _child(side: str, path: Path) -> None:
    # Imports are not timed (torch's alone takes seconds on this machine); their memory is in the peak RSS.
    if side == "twotower":
        import twotower.data
        import twotower.pipeline  # noqa: F401
    else:
        import pandas  # noqa: F401
    started = time.perf_counter()
    counts = (measure_twotower if side == "twotower" else measure_pandas)(path)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"side": side, "seconds": seconds, "peak_rss_gib": peak_kib / 2**20, **counts}))


def _baseline_rss() -> float:
    """Peak RSS of a process that only imports what both sides import (Python, numpy, pyarrow, pandas)."""
    code = "import numpy, pyarrow, pandas, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--users", type=int, default=5_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", choices=["time", "shuffled"], default="time", help="rows in time order or not")
    parser.add_argument("--path", type=Path, default=None, help="where the log is kept (default: /tmp, by size)")
    parser.add_argument("--child", choices=["twotower", "pandas"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    suffix = "" if args.order == "time" else "-shuffled"
    path = args.path or Path(f"/tmp/twotower-ingest-{args.rows}-{args.users}-{args.items}-{args.seed}{suffix}.parquet")
    if args.child:
        _child(args.child, path)
        return
    if not path.exists():
        started = time.perf_counter()
        generate(path, args.rows, args.users, args.items, args.seed, shuffled=args.order == "shuffled")
        print(f"generated {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f}s")
    results: dict[str, list[dict[str, float]]] = {"twotower": [], "pandas": []}
    for round_number in range(args.rounds):
        order = ("twotower", "pandas") if round_number % 2 == 0 else ("pandas", "twotower")
        for side in order:
            out = subprocess.run(
                [sys.executable, __file__, "--child", side, "--path", str(path)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            row = json.loads(out.strip().splitlines()[-1])
            results[side].append(row)
            print(f"round {round_number + 1} {side:<9} {row['seconds']:7.1f}s  peak RSS {row['peak_rss_gib']:.2f} GiB")
    base = _baseline_rss()
    print(f"\n{args.rows:,} interactions, {args.users:,} users, {args.items:,} items, {args.order} order; "
          f"{args.rounds} interleaved rounds, medians (imports alone: {base:.2f} GiB)")  # fmt: skip
    print(f"{'':<10}{'seconds':>9}{'rows/s':>14}{'peak RSS GiB':>14}{'min-max s':>14}")
    medians = {}
    for side, rows in results.items():
        seconds = statistics.median(row["seconds"] for row in rows)
        rss = statistics.median(row["peak_rss_gib"] for row in rows)
        medians[side] = (seconds, rss)
        spread = f"{min(r['seconds'] for r in rows):.1f}-{max(r['seconds'] for r in rows):.1f}"
        print(f"{side:<10}{seconds:>9.1f}{args.rows / seconds:>14,.0f}{rss:>14.2f}{spread:>14}")
    speed = medians["pandas"][0] / medians["twotower"][0]
    memory = medians["twotower"][1] / medians["pandas"][1]
    pairs = [p["seconds"] / t["seconds"] for t, p in zip(results["twotower"], results["pandas"], strict=True)]
    print(
        f"twotower speed / pandas': {speed:.2f}x (per round {', '.join(f'{r:.2f}' for r in pairs)}); "
        f"peak memory twotower / pandas: {memory:.2f}"
    )


if __name__ == "__main__":
    main()
