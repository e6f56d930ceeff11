"""A generated implicit-feedback data set with a known latent structure, for examples and tests.

Users and items get random latent vectors; each user interacts with items drawn from a softmax over
``user . item / temperature`` plus an item popularity term, so a two-tower model can learn real structure and
top-K accuracy measures something (unlike uniformly random pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticInteractions:
    """Interactions split into train and test.

    Attributes:
        train_users, train_items: ``[n_train]`` int64 ids of the training pairs.
        test_users, test_items: ``[n_test]`` int64 ids of the held-out pairs.
        num_users, num_items: vocabulary sizes (ids are ``0..n-1``).
    """

    train_users: torch.Tensor
    train_items: torch.Tensor
    test_users: torch.Tensor
    test_items: torch.Tensor
    num_users: int
    num_items: int


def make_synthetic_interactions(
    num_users: int = 1000,
    num_items: int = 500,
    interactions_per_user: int = 40,
    latent_dim: int = 8,
    temperature: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SyntheticInteractions:
    """Generate interactions; every argument must be positive (``test_fraction`` in ``(0, 1)``).

    Returns:
        A :class:`SyntheticInteractions` with ``num_users * interactions_per_user`` pairs, shuffled and split.
    """
    for name, value in (
        ("num_users", num_users),
        ("num_items", num_items),
        ("interactions_per_user", interactions_per_user),
        ("latent_dim", latent_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    users = torch.randn(num_users, latent_dim, generator=generator) / latent_dim**0.5
    items = torch.randn(num_items, latent_dim, generator=generator) / latent_dim**0.5
    popularity = torch.randn(num_items, generator=generator)
    logits = (users @ items.T) / temperature + popularity
    chosen = torch.multinomial(
        torch.softmax(logits, dim=1), interactions_per_user, replacement=True, generator=generator
    )
    user_ids = torch.arange(num_users).repeat_interleave(interactions_per_user)
    item_ids = chosen.reshape(-1)
    order = torch.randperm(user_ids.shape[0], generator=generator)
    user_ids, item_ids = user_ids[order], item_ids[order]
    num_test = max(1, round(test_fraction * user_ids.shape[0]))
    return SyntheticInteractions(
        train_users=user_ids[num_test:],
        train_items=item_ids[num_test:],
        test_users=user_ids[:num_test],
        test_items=item_ids[:num_test],
        num_users=num_users,
        num_items=num_items,
    )
