"""The training math of AnisotropicIVF (twotower.indexes.quantization), against numpy computed independently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from twotower.indexes import quantization


def _anisotropic_loss(residual: np.ndarray, reconstruction: np.ndarray, direction: np.ndarray, eta: float) -> float:
    """||e||^2 + (eta - 1) (e . u)^2 in float64, e = residual - reconstruction."""
    error = residual.astype(np.float64) - reconstruction.astype(np.float64)
    return float(error @ error + (eta - 1.0) * (error @ direction.astype(np.float64)) ** 2)


def test_kmeans_finds_separated_clusters_and_nearest_matches_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(300) % 3
    points = means[labels] + 0.1 * torch.randn(300, 2, generator=generator)
    centroids = quantization.kmeans(points, 3, 10, generator)
    # Each true cluster's mean, computed by hand, is one of the centroids.
    for cluster in range(3):
        expected = points[labels == cluster].numpy().astype(np.float64).mean(0)
        assert np.min(np.abs(centroids.numpy() - expected).max(1)) < 1e-4
    queries = torch.randn(50, 2, generator=generator) * 6
    distances = ((queries.numpy()[:, None, :] - centroids.numpy()[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(quantization.nearest_centroids(queries, centroids).numpy(), distances.argmin(1))


def _tight_clusters(clusters: int, per_cluster: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    means = 10.0 * torch.randn(clusters, 8, generator=generator)
    labels = torch.arange(clusters * per_cluster) % clusters
    return means[labels] + 0.01 * torch.randn(clusters * per_cluster, 8, generator=generator), labels


def test_plus_plus_seeding_finds_every_cluster_that_random_starts_merge() -> None:
    """60 tight clusters, 60 centroids: k-means++ puts one centroid on each cluster's mean (numpy, float64),
    so every partition is one cluster; random starts leave some clusters without one, and Lloyd's rounds do not
    recover them."""
    points, labels = _tight_clusters(60, 50, seed=3)
    means = np.stack([points[labels == c].double().numpy().mean(0) for c in range(60)])
    seeded = quantization.kmeans(points, 60, 10, torch.Generator().manual_seed(0), seeding="plus_plus")
    assert np.abs(seeded.double().numpy()[:, None, :] - means[None]).max(-1).min(0).max() < 1e-3
    random_starts = quantization.kmeans(points, 60, 10, torch.Generator().manual_seed(0), seeding="random")
    missed = np.abs(random_starts.double().numpy()[:, None, :] - means[None]).max(-1).min(0) > 1e-3
    assert missed.sum() >= 5
    # The imbalance by hand: sizes of the nearest-centroid partitions, leaves * sum(size^2) / n^2. Two random
    # starts in one tight cluster split it, and float32 decides the points between them: 1% there.
    for centroids, tolerance in ((seeded, 1e-12), (random_starts, 1e-2)):
        nearest = ((points.double().numpy()[:, None, :] - centroids.double().numpy()[None]) ** 2).sum(-1).argmin(1)
        sizes = np.bincount(nearest, minlength=60).astype(np.float64)
        expected = 60 * (sizes**2).sum() / sizes.sum() ** 2
        assert quantization.partition_imbalance(points, centroids) == pytest.approx(expected, rel=tolerance)
    assert quantization.partition_imbalance(points, seeded) == pytest.approx(1.0)
    assert quantization.partition_imbalance(points, random_starts) > 1.1
    with pytest.raises(ValueError, match="seeding must be"):
        quantization.kmeans(points, 4, 1, torch.Generator(), seeding="farthest")


def test_plus_plus_seeding_draws_distinct_points_and_handles_coincident_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(500, 4, generator=generator)
    starts = quantization.kmeans_plus_plus(points, 20, generator)
    # Every start is one of the points, and no point is drawn twice (its distance is then 0).
    matches = (starts[:, None, :] == points[None]).all(-1)
    assert matches.sum(1).tolist() == [1] * 20
    assert len({int(i) for i in matches.float().argmax(1)}) == 20
    same = torch.ones(30, 4)  # all points equal: every distance is 0, and the starts are still points
    assert torch.equal(quantization.kmeans_plus_plus(same, 5, generator), torch.ones(5, 4))


def test_encode_is_nearest_codeword_when_isotropic_and_a_coordinate_minimum_otherwise() -> None:
    generator = torch.Generator().manual_seed(1)
    subspaces, sub_dim, n = 4, 2, 200
    codebooks = torch.randn(subspaces, 16, sub_dim, generator=generator)
    points = torch.randn(n, subspaces * sub_dim, generator=generator)
    residuals = 0.5 * torch.randn(n, subspaces * sub_dim, generator=generator)
    directions = quantization.unit_directions(points)
    r, cb = residuals.numpy().reshape(n, subspaces, sub_dim), codebooks.numpy()
    nearest = ((r[:, :, None, :] - cb[None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(quantization.encode(residuals, directions, 1.0, codebooks).numpy(), nearest)

    eta = 6.0
    codes = quantization.encode(residuals, directions, eta, codebooks, passes=6).numpy().astype(np.int64)
    u = directions.numpy()
    for i in range(n):
        chosen = cb[np.arange(subspaces), codes[i]].reshape(-1)
        loss = _anisotropic_loss(residuals[i].numpy(), chosen, u[i], eta)
        isotropic = cb[np.arange(subspaces), nearest[i]].reshape(-1)
        assert loss <= _anisotropic_loss(residuals[i].numpy(), isotropic, u[i], eta) + 1e-9
        # No single subspace's code can be changed to lower the loss (coordinate descent converged).
        for m, c in itertools.product(range(subspaces), range(16)):
            changed = codes[i].copy()
            changed[m] = c
            other = cb[np.arange(subspaces), changed].reshape(-1)
            assert _anisotropic_loss(residuals[i].numpy(), other, u[i], eta) >= loss - 1e-6


def test_anisotropic_codes_lower_the_parallel_error() -> None:
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(2000, 8, generator=generator)
    directions = quantization.unit_directions(points)
    codebooks = quantization.train_codebooks(points, directions, 1.0, 4, 2, torch.Generator().manual_seed(0))
    parallel = {}
    for eta in (1.0, 8.0):
        codes = quantization.encode(points, directions, eta, codebooks).numpy().astype(np.int64)
        reconstruction = codebooks.numpy()[np.arange(4), codes].reshape(2000, 8)
        error = points.numpy() - reconstruction
        parallel[eta] = float(np.mean(np.sum(error * directions.numpy(), 1) ** 2))
    assert parallel[8.0] < 0.7 * parallel[1.0]


def test_update_codebooks_solves_the_weighted_least_squares_problem() -> None:
    generator = torch.Generator().manual_seed(3)
    n, subspaces, sub_dim, eta = 300, 4, 2, 3.0
    residuals = torch.randn(n, subspaces * sub_dim, generator=generator)
    directions = quantization.unit_directions(torch.randn(n, subspaces * sub_dim, generator=generator))
    codes = torch.randint(16, (n, subspaces), generator=generator).to(torch.uint8)
    start = torch.randn(subspaces, 16, sub_dim, generator=generator)
    got = quantization.update_codebooks(residuals, directions, eta, codes, start).numpy()
    # numpy by hand: S_i selects row i's codewords from theta; W_i = I + (eta - 1) u u^T.
    size = subspaces * 16 * sub_dim
    normal, right = np.zeros((size, size)), np.zeros(size)
    counts = np.zeros(size)
    for i in range(n):
        selection = np.zeros((subspaces * sub_dim, size))
        for m in range(subspaces):
            for t in range(sub_dim):
                selection[m * sub_dim + t, (m * 16 + int(codes[i, m])) * sub_dim + t] = 1.0
        u = directions[i].numpy().astype(np.float64)
        weight = np.eye(subspaces * sub_dim) + (eta - 1.0) * np.outer(u, u)
        normal += selection.T @ weight @ selection
        right += selection.T @ weight @ residuals[i].numpy().astype(np.float64)
        counts += selection.sum(0)
    ridge = 1e-3 * counts.mean()
    expected = np.linalg.solve(
        normal + ridge * np.eye(size), right + ridge * start.numpy().reshape(-1).astype(np.float64)
    )
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-4, atol=1e-5)


def test_pack_codes_lays_out_blocks_of_32_per_partition() -> None:
    generator = torch.Generator().manual_seed(4)
    counts = [3, 33, 0, 32]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int64)
    codes = torch.randint(16, (sum(counts), 4), generator=generator).to(torch.uint8)
    packed, leaf_blocks = quantization.pack_codes(codes, offsets)
    assert leaf_blocks.tolist() == [0, 1, 3, 3]  # 1, 2, 0 and 1 blocks
    assert packed.shape == (4, 2, 32)
    expected = np.zeros((4, 2, 32), dtype=np.uint8)
    for leaf, count in enumerate(counts):
        for rank in range(count):
            row = int(offsets[leaf]) + rank
            block, j = int(leaf_blocks[leaf]) + rank // 32, rank % 32
            for pair in range(2):
                expected[block, pair, j] = int(codes[row, 2 * pair]) | (int(codes[row, 2 * pair + 1]) << 4)
    np.testing.assert_array_equal(packed.numpy(), expected)
