import math

import pytest
import torch

from spearfl.losses.spear import (
    anchor_loss,
    likelihood_loss,
    tail_mask,
    unlikelihood_loss,
    unlikelihood_mask,
)


def log(values):
    return torch.log(torch.tensor(values, dtype=torch.float64))


def test_likelihood_loss_is_the_mean_over_masked_tokens_of_the_whole_batch():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    assert likelihood_loss(logprobs, mask).item() == pytest.approx((2.0 + 3.0 + 0.5) / 3)


def test_likelihood_loss_of_an_empty_mask_is_zero_not_nan():
    loss = likelihood_loss(torch.tensor([[-1.0, -2.0]]), torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0


def test_unlikelihood_margin_per_sequence_mean_and_confidence():
    probabilities = [[0.9, 0.2, 0.5], [0.6, 0.1, 0.99]]
    mask = torch.tensor([[True, True, True], [False, True, True]])
    confidence = torch.tensor([1.0, 0.5])
    loss = unlikelihood_loss(log(probabilities), mask, confidence, margin=0.3)
    # Row 0: 0.9 -> -log 0.1, 0.2 is under the margin -> 0, 0.5 -> -log 0.5; mean over its 3 masked tokens.
    row_0 = (-math.log(0.1) + 0.0 - math.log(0.5)) / 3
    # Row 1: 0.6 is masked out; 0.1 -> 0; 0.99 -> -log 0.01; mean over its 2 masked tokens.
    row_1 = (0.0 - math.log(0.01)) / 2
    expected = (1.0 * row_0 + 0.5 * row_1) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The reference weighted every sequence by the batch's mean confidence: a different number.
    batch_mean_confidence = 0.75 * (row_0 + row_1) / 2
    assert abs(loss.item() - batch_mean_confidence) > 0.1


def test_unlikelihood_tokens_under_the_margin_cost_nothing():
    logprobs = log([[0.29, 0.05, 0.2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = unlikelihood_loss(logprobs, mask, torch.tensor([1.0]), margin=0.3)
    assert loss.item() == 0.0
    assert unlikelihood_loss(logprobs, mask, torch.tensor([1.0]), margin=0.0).item() == pytest.approx(
        -(math.log(0.71) + math.log(0.95) + math.log(0.8)) / 3, rel=1e-6
    )


def test_unlikelihood_is_finite_when_a_token_is_certain():
    logprobs = torch.tensor([[0.0, -1e-12]], requires_grad=True)
    loss = unlikelihood_loss(logprobs, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), margin=0.3)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 10
    assert torch.isfinite(logprobs.grad).all()


def test_unlikelihood_gradient_pushes_probability_down():
    logprobs = log([[0.8]]).float().requires_grad_(True)
    unlikelihood_loss(logprobs, torch.ones(1, 1, dtype=torch.bool), torch.tensor([1.0]), margin=0.3).backward()
    # d/dlogp of -log(1 - e^logp) = p / (1 - p) = 4 > 0: descent lowers log p.
    assert logprobs.grad.item() == pytest.approx(4.0, rel=1e-5)


def test_tail_mask_keeps_the_last_tokens_of_each_left_padded_row():
    completion_mask = torch.tensor(
        [
            [False, False, True, True, True],
            [False, False, False, True, True],
            [False, True, True, True, True],
            [False, False, False, False, True],
        ]
    )
    assert tail_mask(completion_mask, 2).tolist() == [
        [False, False, False, True, True],
        [False, False, False, True, True],
        [False, False, False, True, True],
        [False, False, False, False, True],
    ]
    assert tail_mask(completion_mask, 3).tolist() == [
        [False, False, True, True, True],
        [False, False, False, True, True],
        [False, False, True, True, True],
        [False, False, False, False, True],
    ]


def test_unlikelihood_mask_drops_eos_and_protected_tokens_from_the_tail():
    eos = 2
    completion_mask = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    targets = torch.tensor([[0, 10, 11, 12, eos], [0, 0, 20, 21, 22]])
    protected = torch.tensor([[False, False, True, False, False], [False, False, False, False, True]])
    mask = unlikelihood_mask(completion_mask, targets, protected, num_tail_tokens=3, end_ids=torch.tensor([eos]))
    # Row 0 tail = tokens 11, 12, EOS; 11 protected, EOS removed -> only 12.
    # Row 1 tail = 20, 21, 22; 22 protected -> 20, 21.
    assert mask.tolist() == [[False, False, False, True, False], [False, False, True, True, False]]


def test_anchor_loss_is_the_squared_distance_and_its_gradient():
    parameters = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    reference = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]]), "unused": torch.tensor([5.0])}
    loss = anchor_loss(parameters, reference)
    assert loss.item() == pytest.approx(1.0 + 4.0 + 4.0)
    loss.backward()
    assert parameters["a"].grad.tolist() == [2.0, 4.0]
    assert parameters["b"].grad.tolist() == [[4.0]]
    assert anchor_loss({"a": torch.tensor([1.0])}, {"a": torch.tensor([1.0])}).item() == 0.0
