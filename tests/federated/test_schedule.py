import math

import pytest

from spearfl.federated.schedule import learning_rate


def test_warmup_then_cosine_by_hand():
    # 10 rounds, 2 warm-up rounds, base 1.0, floor 0.1
    values = [learning_rate(round_index, 10, 1.0, 2, 0.1) for round_index in range(1, 11)]
    assert values[0] == pytest.approx(0.5)  # 1/2 of the way up
    assert values[1] == pytest.approx(1.0)  # warm-up reaches base
    assert values[2] == pytest.approx(1.0)  # decay progress 0/8
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5)  # progress 4/8: cos(pi/2) = 0
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(7 * math.pi / 8)))  # progress 7/8
    assert all(later <= earlier for earlier, later in zip(values[1:], values[2:]))


def test_no_warmup_starts_at_base_and_never_reaches_zero():
    values = [learning_rate(round_index, 4, 2e-5, 0, 0.0) for round_index in range(1, 5)]
    assert values[0] == pytest.approx(2e-5)
    assert values[2] == pytest.approx(2e-5 * 0.5 * (1 + math.cos(math.pi / 2)))  # progress 2/4
    assert min(values) > 0


def test_all_warmup():
    assert [learning_rate(round_index, 4, 1.0, 4, 0.0) for round_index in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    "arguments",
    [(0, 10, 1.0, 2, 0.1), (11, 10, 1.0, 2, 0.1), (1, 10, 1.0, 11, 0.1), (1, 10, 1.0, 2, 1.5)],
)
def test_out_of_range_arguments_raise(arguments):
    with pytest.raises(ValueError):
        learning_rate(*arguments)
