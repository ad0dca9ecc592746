"""Deterministic pool / held-out split and Dirichlet label-skew partition of the pool over clients.

The packaged benchmarks ship no training split, so the project makes its own: a seeded shuffle of
the examples sorted by uid, whatever order a loader returned them in.

The partition follows Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification" (arXiv 1909.06335): each client draws its class mix
q ~ Dirichlet(alpha * num_classes * prior), prior being the pool's class frequencies, so
alpha = 1 with balanced classes is Dirichlet(1, ..., 1) and a large alpha tends to IID. Client
sizes are drawn between the bounds, then clients take examples of the classes their mix picks,
in turns, without replacement. Examples left over once every client is full stay unused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spearfl.data.schema import Example


def split_pool_heldout(
    examples: Sequence[Example], heldout_size: int, seed: int | Sequence[int]
) -> tuple[list[Example], list[Example]]:
    """(pool, held-out): disjoint, in a seeded shuffled order, independent of the input order. `seed`: numpy's seed,
    an integer or a sequence of them."""
    ordered = _sorted_by_uid(examples)
    if not 0 <= heldout_size <= len(ordered):
        raise ValueError(f"heldout_size {heldout_size} outside 0..{len(ordered)} (the number of examples)")
    order = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[index] for index in order]
    return shuffled[heldout_size:], shuffled[:heldout_size]


def split_each_client(
    clients: Sequence[Sequence[Example]], fraction: float, seed: int
) -> tuple[list[list[Example]], list[list[Example]]]:
    """(each client's training pool, each client's own held-out set): per client, round(fraction x its examples)
    held out (at least one where fraction > 0), in an order seeded by (seed, client). fraction 0: nothing held out."""
    if fraction == 0:
        return [list(examples) for examples in clients], [[] for _ in clients]
    pools, heldout = [], []
    for client, examples in enumerate(clients):
        count = max(1, round(fraction * len(examples)))
        if count >= len(examples):
            raise ValueError(
                f"client {client} has {len(examples)} examples: too few to hold out {fraction:g} of them and train on "
                "the rest (raise data.min_per_client, or lower data.client_heldout_fraction)"
            )
        pool, own = split_pool_heldout(examples, count, seed=[seed, client])
        pools.append(pool)
        heldout.append(own)
    return pools, heldout


def dirichlet_partition(
    examples: Sequence[Example],
    num_clients: int,
    alpha: float,
    min_per_client: int,
    max_per_client: int,
    seed: int,
) -> list[list[Example]]:
    """Label-skewed, disjoint client datasets of min_per_client..max_per_client examples each."""
    ordered = _sorted_by_uid(examples)
    _check_partition_arguments(len(ordered), num_clients, alpha, min_per_client, max_per_client)
    rng = np.random.default_rng(seed)
    classes = sorted({example.class_label for example in ordered})
    by_class = [[example for example in ordered if example.class_label == name] for name in classes]
    for members in by_class:
        rng.shuffle(members)
    prior = np.array([len(members) for members in by_class], dtype=float) / len(ordered)  # [C]
    mixes = rng.dirichlet(alpha * len(classes) * prior, size=num_clients)  # [K, C]
    sizes = client_sizes(len(ordered), num_clients, min_per_client, max_per_client, rng)  # [K]
    return _deal(by_class, mixes, sizes, rng)


def client_sizes(
    num_examples: int, num_clients: int, min_per_client: int, max_per_client: int, rng: np.random.Generator
) -> np.ndarray:
    """Sizes drawn uniformly in [min, max], shrunk toward min when the examples do not suffice. [K]"""
    sizes = rng.integers(min_per_client, max_per_client + 1, size=num_clients)  # [K]
    spare = num_examples - num_clients * min_per_client
    extra = sizes - min_per_client  # [K]
    if extra.sum() > spare:
        extra = np.floor(extra * (spare / extra.sum())).astype(int)
    return min_per_client + extra


def _deal(
    by_class: list[list[Example]], mixes: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> list[list[Example]]:
    """Clients take one example at a time, in turns, from a class drawn from their mix.

    Taking turns keeps a client that comes first from emptying the classes others prefer; an
    emptied class is dropped from every mix.
    """
    remaining = np.array([len(members) for members in by_class])  # [C]
    clients: list[list[Example]] = [[] for _ in sizes]
    while any(len(client) < size for client, size in zip(clients, sizes)):
        for client_index, client in enumerate(clients):
            if len(client) == sizes[client_index]:
                continue
            weights = mixes[client_index] * (remaining > 0)  # [C]
            if weights.sum() == 0:  # the mix puts all its mass on emptied classes
                weights = (remaining > 0).astype(float)
            class_index = rng.choice(len(remaining), p=weights / weights.sum())
            remaining[class_index] -= 1
            client.append(by_class[class_index][remaining[class_index]])
    return clients


def _check_partition_arguments(
    num_examples: int, num_clients: int, alpha: float, min_per_client: int, max_per_client: int
) -> None:
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients} and {alpha}")
    if not 0 <= min_per_client <= max_per_client:
        raise ValueError(f"need 0 <= min_per_client <= max_per_client, got {min_per_client} and {max_per_client}")
    if num_clients * min_per_client > num_examples:
        raise ValueError(
            f"{num_clients} clients x {min_per_client} examples need {num_clients * min_per_client},"
            f" but only {num_examples} examples are available"
        )


def _sorted_by_uid(examples: Sequence[Example]) -> list[Example]:
    ordered = sorted(examples, key=lambda example: example.uid)
    for previous, current in zip(ordered, ordered[1:]):
        if previous.uid == current.uid:
            raise ValueError(f"duplicate uid {current.uid!r}: splits are keyed on uids")
    return ordered
