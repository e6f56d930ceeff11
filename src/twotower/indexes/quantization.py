"""Training of :class:`twotower.indexes.AnisotropicIVF`: k-means partitions and score-aware 4-bit product codes.

Pure functions on CPU float32 tensors, after Guo et al. (2020), "Accelerating Large-Scale Inference with
Anisotropic Vector Quantization" (the quantizer of ScaNN):

* :func:`kmeans` / :func:`nearest_centroids`: the partitions (Lloyd's algorithm on squared distances);
* :func:`train_codebooks` / :func:`encode`: product quantization of the residuals ``x - centroid(x)`` over
  subspaces of ``sub_dim`` dimensions with 16 codewords each (4-bit codes), minimising the *anisotropic* loss
  ``||e||^2 + (eta - 1) (e . x / ||x||)^2`` of each quantization error ``e`` instead of ``||e||^2``. An error
  parallel to the datapoint changes its score with every query that scores it highly, which is what a top-k
  search ranks by; an orthogonal error mostly changes the scores of queries that score it low. ``eta`` (the
  ``parallel_weight``, ``h_parallel / h_orthogonal`` in the paper) above 1 trades the second for the first;
  ``eta = 1`` is ordinary product quantization;
* :func:`pack_codes`: the codes laid out as the native scan reads them (``native/ivf.c``).
"""

from __future__ import annotations

import math

import torch

#: Codewords per subspace: 4-bit codes, the width one byte-shuffle instruction looks up.
CODEWORDS = 16
#: Candidates per block of packed codes.
BLOCK = 32


def kmeans(
    points: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator, seeding: str = "random"
) -> torch.Tensor:
    """``[clusters, d]`` centroids of ``points`` ``[n, d]`` after ``iterations`` rounds of Lloyd's algorithm,
    started from distinct random points (``seeding="random"``) or by k-means++ (``"plus_plus"``,
    :func:`kmeans_plus_plus`); repeated points when ``n < clusters``, as for the 16 codewords of a tiny corpus.
    A cluster left empty restarts at a random point."""
    if seeding not in ("random", "plus_plus"):
        raise ValueError(f"seeding must be 'random' or 'plus_plus', got {seeding!r}")
    n = points.shape[0]
    if n >= clusters and seeding == "plus_plus":
        centroids = kmeans_plus_plus(points, clusters, generator)
    elif n >= clusters:
        centroids = points[torch.randperm(n, generator=generator)[:clusters]].clone()
    else:
        centroids = points[torch.randint(n, (clusters,), generator=generator)].clone()
    for _ in range(iterations):
        assignment = nearest_centroids(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=clusters)
        centroids = sums / counts.clamp(min=1).to(points.dtype)[:, None]
        empty = counts == 0
        if bool(empty.any()):
            centroids[empty] = points[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centroids


#: k-means++ draws its starts from at most this many points per cluster (a seeded sample of the points).
SEEDING_POINTS_PER_CLUSTER = 32


def kmeans_plus_plus(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """``[clusters, d]`` starts for k-means (Arthur and Vassilvitskii, 2007): the first a random point, each next
    one drawn with probability proportional to its squared distance from the nearest start so far, among a
    sample of ``SEEDING_POINTS_PER_CLUSTER * clusters`` points (``clusters <= n``).

    Random starts leave many of a corpus's natural clusters with no start (about a third of them when there are
    as many starts as clusters) and split others, and Lloyd's rounds do not undo that: the partitions of a
    clustered corpus come out uneven, and a query's neighbours spread over more of them. Where the points have
    no such clusters but a dense core, k-means++ favours the far points and leaves the core one large partition;
    :func:`partition_imbalance` tells the two apart.
    """
    n = points.shape[0]
    pool_size = min(n, SEEDING_POINTS_PER_CLUSTER * clusters)
    pool = points[torch.randperm(n, generator=generator)[:pool_size]] if pool_size < n else points
    pool = pool.to(torch.float32)
    norms = (pool * pool).sum(1)
    chosen = torch.empty(clusters, dtype=torch.int64)
    chosen[0] = int(torch.randint(pool_size, (1,), generator=generator))
    nearest = (norms - 2 * (pool @ pool[chosen[0]]) + norms[chosen[0]]).clamp_(min=0)
    for i in range(1, clusters):
        total = float(nearest.sum())
        if total > 0 and math.isfinite(total):
            chosen[i] = int(torch.multinomial(nearest, 1, generator=generator))
        else:  # every point coincides with a start (or the distances overflow): any point will do
            chosen[i] = int(torch.randint(pool_size, (1,), generator=generator))
        distance = (norms - 2 * (pool @ pool[chosen[i]]) + norms[chosen[i]]).clamp_(min=0)
        torch.minimum(nearest, distance, out=nearest)
    return pool[chosen].to(points.dtype).clone()


def partition_imbalance(points: torch.Tensor, centroids: torch.Tensor) -> float:
    """``leaves * sum(size^2) / n^2`` of the partitions ``centroids`` make of ``points``: 1 when they are all the
    same size, more as they grow uneven (a query that searches partitions at random scans this many times the
    mean partition's candidates per partition)."""
    sizes = torch.bincount(nearest_centroids(points, centroids), minlength=centroids.shape[0]).double()
    return float(centroids.shape[0] * (sizes * sizes).sum() / sizes.sum() ** 2)


def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``[n]`` int64: the index of each point's nearest centroid by squared distance (``argmax x.c - |c|^2 / 2``,
    one matrix product per chunk of points; chunks small enough that their scores stay in cache for the argmax)."""
    negative_half_norms = -0.5 * (centroids * centroids).sum(1)
    columns = centroids.T.contiguous()
    assignment = torch.empty(points.shape[0], dtype=torch.int64)
    for start in range(0, points.shape[0], chunk):
        scores = torch.addmm(negative_half_norms, points[start : start + chunk], columns)
        assignment[start : start + chunk] = scores.argmax(1)
    return assignment


def unit_directions(points: torch.Tensor) -> torch.Tensor:
    """``points / |points|`` row by row; a zero row stays zero (its scores have no direction to protect)."""
    norms = points.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, points / norms.clamp(min=torch.finfo(points.dtype).tiny), 0.0)


def encode(
    residuals: torch.Tensor,
    directions: torch.Tensor,
    parallel_weight: float,
    codebooks: torch.Tensor,
    passes: int = 3,
    chunk: int = 16_384,
) -> torch.Tensor:
    """The 4-bit codes ``[n, M]`` (uint8) of ``residuals`` ``[n, M * s]`` under ``codebooks`` ``[M, 16, s]``.

    Each row starts from its nearest codeword per subspace (the loss's minimum when ``parallel_weight`` is 1),
    then ``passes`` rounds of coordinate descent change one subspace's code at a time to the codeword that
    minimises the whole row's anisotropic loss with the others fixed (the loss couples the subspaces through
    the error's parallel component ``e . u``, ``u`` the row of ``directions``).
    """
    n = residuals.shape[0]
    subspaces, _codewords, sub_dim = codebooks.shape
    codes = torch.empty(n, subspaces, dtype=torch.uint8)
    extra = parallel_weight - 1.0
    for start in range(0, n, chunk):
        r = residuals[start : start + chunk].view(-1, subspaces, sub_dim)
        u = directions[start : start + chunk].view(-1, subspaces, sub_dim)
        # ||r_m - c||^2 for every subspace and codeword: [c, M, 16]
        distances = ((r[:, :, None, :] - codebooks[None]) ** 2).sum(-1)
        chosen = distances.argmin(-1)
        if extra != 0.0 and passes > 0:
            u_codewords = torch.einsum("nms,mks->nmk", u, codebooks)  # u_m . c: [c, M, 16]
            u_residual = (u * r).sum(-1)  # u_m . r_m: [c, M]
            parallel = (u_residual - u_codewords.gather(2, chosen[:, :, None])[..., 0]).sum(1)  # e . u
            for _ in range(passes):
                for m in range(subspaces):
                    rest = parallel - (u_residual[:, m] - u_codewords[:, m].gather(1, chosen[:, m : m + 1])[:, 0])
                    candidates = rest[:, None] + u_residual[:, m, None] - u_codewords[:, m]  # e . u for each code
                    best = (distances[:, m] + extra * candidates * candidates).argmin(1)
                    chosen[:, m] = best
                    parallel = rest + u_residual[:, m] - u_codewords[:, m].gather(1, best[:, None])[:, 0]
        codes[start : start + chunk] = chosen.to(torch.uint8)
    return codes


def update_codebooks(
    residuals: torch.Tensor,
    directions: torch.Tensor,
    parallel_weight: float,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    chunk: int = 32_768,
) -> torch.Tensor:
    """The codebooks ``[M, 16, s]`` minimising the total anisotropic loss of ``residuals`` with ``codes`` fixed.

    The reconstruction of row ``i`` is ``S_i theta`` (``theta`` every codeword stacked, ``S_i`` picking row i's),
    and its loss ``(r_i - S_i theta)^T W_i (r_i - S_i theta)`` with ``W_i = I + (eta - 1) u_i u_i^T``: one joint
    least-squares problem over all subspaces, ``(sum S_i^T W_i S_i) theta = sum S_i^T W_i r_i``, solved in float64.
    A small ridge towards the current codebooks keeps unused codewords where they are.
    """
    n, dimension = residuals.shape
    subspaces, codewords, sub_dim = codebooks.shape
    size = subspaces * codewords * sub_dim
    # The position in theta of each row's coordinate j: [n, M * s].
    slots = (
        torch.arange(subspaces)[None, :, None] * codewords * sub_dim
        + codes.to(torch.int64)[:, :, None] * sub_dim
        + torch.arange(sub_dim)[None, None, :]
    ).reshape(n, dimension)
    counts = torch.zeros(size, dtype=torch.float64).index_add_(
        0, slots.reshape(-1), torch.ones(n * dimension, dtype=torch.float64)
    )
    normal = torch.diag(counts)
    right = torch.zeros(size, dtype=torch.float64).index_add_(0, slots.reshape(-1), residuals.reshape(-1).double())
    extra = parallel_weight - 1.0
    if extra != 0.0:
        for start in range(0, n, chunk):
            u = directions[start : start + chunk]
            spread = torch.zeros(u.shape[0], size).scatter_(1, slots[start : start + chunk], u)  # S_i^T u_i
            normal += extra * (spread.T @ spread).double()
            right += extra * (spread.T @ (u * residuals[start : start + chunk]).sum(1)).double()
    ridge = 1e-3 * float(counts.mean())
    normal += ridge * torch.eye(size, dtype=torch.float64)
    right += ridge * codebooks.reshape(-1).double()
    solved: torch.Tensor = torch.linalg.solve(normal, right)
    return solved.to(torch.float32).view(subspaces, codewords, sub_dim)


def train_codebooks(
    residuals: torch.Tensor,
    directions: torch.Tensor,
    parallel_weight: float,
    subspaces: int,
    iterations: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[M, 16, s]`` codebooks for ``residuals`` ``[n, M * s]``: per-subspace k-means, then ``iterations``
    alternations of :func:`encode` and :func:`update_codebooks` on the anisotropic loss."""
    n, dimension = residuals.shape
    sub_dim = dimension // subspaces
    parts = residuals.view(n, subspaces, sub_dim)
    codebooks = torch.stack(
        [kmeans(parts[:, m].contiguous(), CODEWORDS, 10, generator) for m in range(subspaces)]
    )  # fmt: skip
    for _ in range(iterations):
        codes = encode(residuals, directions, parallel_weight, codebooks)
        codebooks = update_codebooks(residuals, directions, parallel_weight, codes, codebooks)
    return codebooks


def pack_codes(codes: torch.Tensor, leaf_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out ``codes`` ``[n, M]`` (rows in partition order, values below 16, ``M`` a multiple of 4) as the scan
    reads them.

    Returns:
        ``(packed [blocks, M / 2, 32] uint8, leaf_blocks [leaves] int64)``: each partition's rows in blocks of
        32 (its last block padded with zero codes), ``packed[b, p, j] = code(2p) | code(2p + 1) << 4`` of the
        block's row ``j``, and the first block of each partition.
    """
    n, subspaces = codes.shape
    counts = leaf_offsets[1:] - leaf_offsets[:-1]
    blocks_per_leaf = (counts + BLOCK - 1) // BLOCK
    leaf_blocks = torch.cumsum(blocks_per_leaf, 0) - blocks_per_leaf
    total_blocks = int(blocks_per_leaf.sum())
    # Each row's slot in the padded layout: its partition's first block, then its rank inside the partition.
    leaf_of_row = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    rank = torch.arange(n) - leaf_offsets[:-1][leaf_of_row]
    slot = leaf_blocks[leaf_of_row] * BLOCK + rank
    padded = torch.zeros(total_blocks * BLOCK, subspaces, dtype=torch.uint8)
    padded[slot] = codes
    pairs = padded.view(total_blocks, BLOCK, subspaces // 2, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)  # [blocks, 32, M / 2]
    return packed.transpose(1, 2).contiguous(), leaf_blocks
