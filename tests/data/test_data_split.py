import random
from collections import Counter

import numpy as np
import pytest

from spearfl.data.schema import Example
from spearfl.data.split import client_sizes, dirichlet_partition, split_each_client, split_pool_heldout


def make_examples(num_examples: int, num_options: int = 4) -> list[Example]:
    options = tuple(f"option {index}" for index in range(num_options))
    return [Example(f"toy/test/{index}", f"question {index}", options, gold=index % num_options) for index in range(num_examples)]


def uids(examples: list[Example]) -> list[str]:
    return [example.uid for example in examples]


def test_split_is_disjoint_complete_and_sized():
    examples = make_examples(100)
    pool, heldout = split_pool_heldout(examples, heldout_size=30, seed=1)
    assert len(pool) == 70 and len(heldout) == 30
    assert set(uids(pool)).isdisjoint(uids(heldout))
    assert set(uids(pool)) | set(uids(heldout)) == set(uids(examples))


def test_split_is_deterministic_and_independent_of_input_order():
    examples = make_examples(100)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    first = split_pool_heldout(examples, 30, seed=1)
    assert split_pool_heldout(shuffled, 30, seed=1) == first
    assert uids(split_pool_heldout(examples, 30, seed=2)[1]) != uids(first[1])


def test_split_rejects_bad_sizes_and_duplicate_uids():
    with pytest.raises(ValueError, match="heldout_size"):
        split_pool_heldout(make_examples(10), 11, seed=0)
    with pytest.raises(ValueError, match="duplicate uid"):
        split_pool_heldout(make_examples(10) + make_examples(1), 2, seed=0)


def test_partition_bounds_and_disjointness():
    clients = dirichlet_partition(make_examples(1000), num_clients=8, alpha=1.0, min_per_client=40, max_per_client=60, seed=3)
    assert len(clients) == 8
    assert all(40 <= len(client) <= 60 for client in clients)
    all_uids = [uid for client in clients for uid in uids(client)]
    assert len(all_uids) == len(set(all_uids))


def test_partition_is_reproducible_and_seed_dependent():
    examples = make_examples(600)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    first = dirichlet_partition(examples, 5, 1.0, 50, 80, seed=7)
    assert dirichlet_partition(shuffled, 5, 1.0, 50, 80, seed=7) == first
    assert dirichlet_partition(examples, 5, 1.0, 50, 80, seed=8) != first


def label_share_spread(clients: list[list[Example]]) -> float:
    """Mean over clients of the largest class share: 0.25 is IID for 4 balanced classes, 1.0 is one class each."""
    return float(np.mean([max(Counter(e.class_label for e in client).values()) / len(client) for client in clients]))


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    examples = make_examples(4000)
    skewed = dirichlet_partition(examples, 10, alpha=0.1, min_per_client=100, max_per_client=100, seed=0)
    near_iid = dirichlet_partition(examples, 10, alpha=1000.0, min_per_client=100, max_per_client=100, seed=0)
    assert label_share_spread(skewed) > 0.7
    assert label_share_spread(near_iid) < 0.4


def test_partition_uses_every_example_when_bounds_need_them():
    examples = make_examples(103)
    clients = dirichlet_partition(examples, 4, alpha=0.5, min_per_client=20, max_per_client=40, seed=0)
    assert all(20 <= len(client) <= 40 for client in clients)
    assert sum(len(client) for client in clients) <= 103


def test_client_sizes_shrink_toward_the_minimum():
    sizes = client_sizes(num_examples=100, num_clients=4, min_per_client=20, max_per_client=50, rng=np.random.default_rng(0))
    assert sizes.sum() <= 100 and sizes.min() >= 20 and sizes.max() <= 50


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"num_clients": 11, "min_per_client": 10, "max_per_client": 10}, "only 100 examples"),
        ({"num_clients": 2, "min_per_client": 10, "max_per_client": 5}, "min_per_client <= max_per_client"),
        ({"num_clients": 0, "min_per_client": 1, "max_per_client": 5}, "num_clients >= 1"),
    ],
)
def test_partition_rejects_impossible_requests(arguments, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(make_examples(100), alpha=1.0, seed=0, **arguments)


def test_each_client_holds_out_its_own_share_whatever_the_input_order():
    clients = [make_examples(10), make_examples(30)[10:], make_examples(33)[30:]]
    pools, heldout = split_each_client(clients, fraction=0.2, seed=3)
    assert [len(own) for own in heldout] == [2, 4, 1]  # round(0.2 x n), at least one
    for pool, own, examples in zip(pools, heldout, clients):
        assert set(uids(pool)).isdisjoint(uids(own)) and set(uids(pool)) | set(uids(own)) == set(uids(examples))
    again = split_each_client([list(reversed(examples)) for examples in clients], fraction=0.2, seed=3)
    assert [uids(own) for own in again[1]] == [uids(own) for own in heldout]
    assert split_each_client(clients, fraction=0.0, seed=3) == ([list(c) for c in clients], [[], [], []])
    with pytest.raises(ValueError, match="client 2 has 3 examples"):
        split_each_client(clients, fraction=0.9, seed=3)
