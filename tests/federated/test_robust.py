import pytest
import torch

from spearfl.config import DefenseConfig
from spearfl.federated.robust import COMBINERS, krum_scores, median, multi_krum, norm_clip, trimmed_mean


def adapter(*values):
    return {"lora_A": torch.tensor(values, dtype=torch.float64)}


def combined_values(combiner, states, weights, **settings):
    state, notes = combiner(adapter(*[0.0] * len(states[0]["lora_A"])), states, weights, DefenseConfig(**settings))
    return state["lora_A"].tolist(), notes


def test_median_by_hand_odd_and_even():
    assert combined_values(median, [adapter(1.0), adapter(2.0), adapter(10.0)], [1, 1, 1])[0] == [2.0]
    # even count: the mean of the two middle values, (2 + 4) / 2
    assert combined_values(median, [adapter(1.0), adapter(2.0), adapter(4.0), adapter(10.0)], [1, 1, 1, 1])[0] == [3.0]


def test_median_is_of_updates_and_ignores_weights_but_not_weight_zero():
    global_state = adapter(5.0)
    states = [adapter(6.0), adapter(7.0), adapter(100.0), adapter(-50.0)]
    state, _ = median(global_state, states, [1, 1, 1000, 0], DefenseConfig())
    assert state["lora_A"].tolist() == [7.0]  # median of updates 1, 2, 95 is 2; 5 + 2


def test_trimmed_mean_by_hand():
    values, notes = combined_values(trimmed_mean, [adapter(v) for v in (1.0, 2.0, 4.0, 10.0)], [1] * 4, trim_fraction=0.25)
    assert values == [3.0] and notes == {"trimmed_each_end": 1}  # 1 and 10 dropped: (2 + 4) / 2
    # a fraction that would drop everything leaves the middle value
    values, notes = combined_values(trimmed_mean, [adapter(1.0), adapter(2.0)], [1, 1], trim_fraction=0.49)
    assert values == [1.5] and notes["trimmed_each_end"] == 0


def test_krum_scores_by_hand():
    # n = 5, f = 1: each value's 2 nearest others. 0: 1 + 4; 1: 1 + 1; 2: 1 + 1; 3: 1 + 4; 100: 97^2 + 98^2
    scores = krum_scores(torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]]), num_malicious=1)
    assert scores.tolist() == [5.0, 2.0, 2.0, 5.0, 19013.0]


def test_multi_krum_drops_the_outlier_and_averages_with_weights():
    states = [adapter(v) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    values, notes = combined_values(multi_krum, states, [1, 1, 1, 5, 1], assumed_malicious=1)
    assert notes["selected"] == [0, 1, 2, 3] and notes["krum_f"] == 1
    assert values == pytest.approx([(0 + 1 + 2 + 3 * 5) / 8])


def test_multi_krum_lowers_f_for_few_clients():
    _, notes = combined_values(multi_krum, [adapter(0.0), adapter(1.0), adapter(5.0)], [1, 1, 1], assumed_malicious=2)
    assert notes["krum_f"] == 0 and notes["selected"] == [0, 1, 2]


def test_norm_clip_by_hand():
    states = [adapter(3.0, 4.0), adapter(0.3, 0.4)]  # update norms 5 and 0.5
    values, notes = combined_values(norm_clip, states, [1, 1], clip_norm=1.0)
    assert values == pytest.approx([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]) and notes["clipped"] == [0]


def test_norm_clip_defaults_to_the_median_norm():
    states = [adapter(3.0, 4.0), adapter(0.3, 0.4), adapter(0.6, 0.8)]  # norms 5, 0.5, 1: bound 1
    values, notes = combined_values(norm_clip, states, [1, 1, 1])
    assert notes["clip_norm"] == pytest.approx(1.0)
    assert values == pytest.approx([(0.6 + 0.3 + 0.6) / 3, (0.8 + 0.4 + 0.8) / 3])


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_every_combiner_gives_none_without_contributors_and_leaves_inputs_alone(name):
    global_state, states = adapter(1.0, 1.0), [adapter(2.0, 3.0), adapter(4.0, 5.0), adapter(6.0, 8.0)]
    assert COMBINERS[name](global_state, states, [0, 0, 0], DefenseConfig())[0] is None
    COMBINERS[name](global_state, states, [1, 2, 3], DefenseConfig())
    assert states[0]["lora_A"].tolist() == [2.0, 3.0] and global_state["lora_A"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_every_combiner_agrees_with_identical_clients(name):
    state, _ = COMBINERS[name](adapter(0.0), [adapter(2.0)] * 5, [1, 2, 3, 4, 5], DefenseConfig(clip_norm=10.0))
    assert state["lora_A"].tolist() == [2.0]


def test_layouts_must_match():
    with pytest.raises(ValueError, match="shape"):
        median(adapter(0.0), [adapter(1.0), adapter(1.0, 2.0), adapter(3.0)], [1, 1, 1], DefenseConfig())
