"""The blocked in-batch softmax's settings: float32 gradients computed in the forward ("eager", the default),
from exponentials kept for the backward, or recomputed there, and the products in float32 or bf16, interleaved
at each batch size.

    python benchmarks/blocked_loss.py [--batch-sizes 1024 4096 8192 16384] [--rounds 5]

One forward + backward of ``in_batch_softmax_cross_entropy`` (D = 64, 2 threads) per variant and round; the
variants alternate within each round (their order rotating), and the table gives each one's median milliseconds
and its median per-round ratio to "eager, float32". "kept" and "recomputed" turn the eager gradients off
(``twotower.losses._EAGER_GRADIENTS``); "recomputed" also sets the kept budget to 0 (what a batch above
``twotower.losses._KEPT_ELEMENTS`` logits gets, so above the budget "kept" recomputes too); "3 GEMMs" is
``Q C^T``, ``G C``, ``G^T Q`` alone with fresh outputs (the arithmetic with nothing else). "torch exp" rows
turn off the native row kernel (``native/softmax.c``, built where the CPU has AVX-512 or AVX2) and take torch's
passes for the row maxima, exponentials and sums.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from twotower import _native, losses
from twotower.logits import LogitSteps

VARIANTS = (
    "eager, float32", "eager, float32, torch exp", "kept, float32", "recomputed, float32",
    "recomputed, fp32, torch exp", "kept, bf16", "recomputed, bf16", "3 GEMMs, float32",
)  # fmt: skip


def _step(batch: int, dim: int, variant: str) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    queries = (torch.randn(batch, dim, generator=generator) / 4).requires_grad_(True)
    candidates = (torch.randn(batch, dim, generator=generator) / 4).requires_grad_(True)
    if variant.startswith("3 GEMMs"):
        upstream = torch.randn(batch, batch, generator=generator)
        q, c = queries.detach(), candidates.detach()

        def gemms() -> None:
            _ = q @ c.T
            _ = upstream @ c
            _ = upstream.T @ q

        return gemms
    steps = LogitSteps(matmul_dtype=torch.bfloat16 if variant.endswith("bf16") else None)
    budget = 0 if variant.startswith("recomputed") else losses._KEPT_ELEMENTS
    eager = variant.startswith("eager")

    kernel_rows = (lambda *args, **kwargs: None) if variant.endswith("torch exp") else _native._vectorized_rows

    def loss_step() -> None:
        saved = losses._KEPT_ELEMENTS, losses._EAGER_GRADIENTS, _native._vectorized_rows
        losses._KEPT_ELEMENTS, losses._EAGER_GRADIENTS, _native._vectorized_rows = budget, eager, kernel_rows
        try:
            losses.in_batch_softmax_cross_entropy(queries, candidates, steps=steps).sum().backward()
        finally:
            losses._KEPT_ELEMENTS, losses._EAGER_GRADIENTS, _native._vectorized_rows = saved

    return loss_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, D = {args.dim}, {args.rounds} rounds")
    print(f"kept budget: {losses._KEPT_ELEMENTS:,} logits\n")
    print(f"{'batch':>6}  {'variant':<30}{'ms':>10}{'ratio to eager fp32':>22}")
    for batch in args.batch_sizes:
        steps = {variant: _step(batch, args.dim, variant) for variant in VARIANTS}
        for step in steps.values():
            step()  # warm-up
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for round_ in range(args.rounds):
            order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
            for variant in order:
                started = time.perf_counter()
                steps[variant]()
                times[variant].append(time.perf_counter() - started)
        for variant in VARIANTS:
            ratios = [a / b for a, b in zip(times[variant], times["eager, float32"], strict=True)]
            print(
                f"{batch:>6}  {variant:<30}{1000 * statistics.median(times[variant]):>10.1f}"
                f"{statistics.median(ratios):>10.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            )


if __name__ == "__main__":
    main()
