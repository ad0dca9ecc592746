"""Policy-gradient loss terms against hand-computed values on tiny tensors."""

import doctest
import math

import pytest
import torch

import spearfl.losses.policy
from spearfl.losses.policy import (
    clipped_fraction,
    clipped_surrogate_loss,
    group_advantages,
    k3_kl,
    reinforce_loss,
    rltf_advantages,
)


def test_docstring_examples():
    assert doctest.testmod(spearfl.losses.policy).failed == 0


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    advantages = group_advantages(rewards, epsilon=0.0)
    # Group 0: mean 1/4, population std sqrt(3/16) = sqrt(3)/4.
    std = math.sqrt(3) / 4
    expected_first = [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]
    assert advantages[0].tolist() == pytest.approx(expected_first)
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # zero variance: no signal, and no NaN
    assert advantages[2].tolist() == pytest.approx([-1.0, 1.0, 1.0, -1.0])  # mean 1/2, std 1/2


def test_group_advantages_epsilon_keeps_a_constant_group_at_zero():
    advantages = group_advantages(torch.tensor([[0.0, 0.0, 0.0]]))
    assert torch.equal(advantages, torch.zeros(1, 3))
    assert group_advantages(torch.tensor([[1.0, 0.0]]), epsilon=0.5).tolist() == [[0.5, -0.5]]  # 0.5 / (0.5 + 0.5)


def test_rltf_advantages_use_each_groups_own_baselines():
    """Two prompts, three first attempts each; NaN: a right first attempt ends its episode (no revision)."""
    nan = float("nan")
    first_rewards = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    revision_rewards = torch.tensor([[1.0, nan, 0.0], [nan, nan, nan]])
    first, second, distill = rltf_advantages(first_rewards, revision_rewards, discount=0.1)
    # prompt 0: returns r0 + 0.1 r1 = [0.1, 1, 0], mean 1.1 / 3; revised r1 = [1, 0], mean 0.5; mean r0 = 1/3
    mean_return = 1.1 / 3
    assert first[0].tolist() == pytest.approx([0.1 - mean_return, 1 - mean_return, -mean_return])
    assert second[0].tolist() == pytest.approx([0.5, 0.0, -0.5])
    assert distill[0].tolist() == pytest.approx([2 / 3, 0.0, -1 / 3])  # a wrong revision is pushed down
    # prompt 1: every first attempt right, nothing to revise: no signal, whatever the other group did
    assert first[1].tolist() == second[1].tolist() == distill[1].tolist() == [0.0, 0.0, 0.0]


def surrogate_case():
    """Two sequences of three positions; the last position of row 1 is padding."""
    ratios = torch.tensor([[1.1, 1.5, 0.5], [1.5, 0.5, 2.0]], dtype=torch.float64)
    old = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.6, 0.1]], dtype=torch.float64))
    new = (old + torch.log(ratios)).requires_grad_(True)
    advantages = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return new, old, advantages, mask


def test_clipped_surrogate_value():
    new, old, advantages, mask = surrogate_case()
    loss = clipped_surrogate_loss(new, old, advantages, mask, epsilon=0.2)
    # Row 0 (A = 2): min(1.1 * 2, 1.1 * 2) = 2.2; min(1.5 * 2, 1.2 * 2) = 2.4; min(0.5 * 2, 0.8 * 2) = 1.0.
    # Row 1 (A = -1): min(-1.5, -1.2) = -1.5; min(-0.5, -0.8) = -0.8; the third token is padding.
    expected = -(2.2 + 2.4 + 1.0 - 1.5 - 0.8) / 5
    assert loss.item() == pytest.approx(expected)


def test_clipped_tokens_send_no_gradient_and_the_others_do():
    new, old, advantages, mask = surrogate_case()
    clipped_surrogate_loss(new, old, advantages, mask, epsilon=0.2).backward()
    gradient = new.grad
    # d(-ratio * A / 5) / d logprob = -ratio * A / 5 where the unclipped term is the minimum.
    assert gradient[0, 0].item() == pytest.approx(-1.1 * 2.0 / 5)
    assert gradient[0, 1].item() == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped
    assert gradient[0, 2].item() == pytest.approx(-0.5 * 2.0 / 5)  # below the range but A > 0: pessimistic, not clipped
    assert gradient[1, 0].item() == pytest.approx(1.5 / 5)  # above the range but A < 0: not clipped
    assert gradient[1, 1].item() == 0.0  # ratio 0.5 < 0.8 with A < 0: clipped
    assert gradient[1, 2].item() == 0.0  # padding


def test_clipped_fraction_counts_the_clipped_tokens():
    new, old, advantages, mask = surrogate_case()
    assert clipped_fraction(new, old, advantages, mask, epsilon=0.2) == pytest.approx(2 / 5)


def test_surrogate_at_ratio_one_is_the_policy_gradient():
    """Before any update (new = old) the surrogate's gradient is REINFORCE's."""
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.8, 0.1]], dtype=torch.float64))
    advantages = torch.tensor([1.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    first, second = logprobs.clone().requires_grad_(True), logprobs.clone().requires_grad_(True)
    clipped_surrogate_loss(first, logprobs, advantages, mask, epsilon=0.2).backward()
    reinforce_loss(second, advantages, mask).backward()
    assert torch.allclose(first.grad, second.grad)


def test_k3_kl_value_and_zero_at_the_reference():
    policy = torch.log(torch.tensor([[0.5, 0.2], [0.4, 0.9]], dtype=torch.float64)).requires_grad_(True)
    reference = torch.log(torch.tensor([[0.25, 0.2], [0.8, 0.3]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    kl = k3_kl(policy, reference, mask)
    # exp(d) - d - 1 with d = log(q / p): q/p = 0.5, 1, 2 on the three real tokens.
    expected = ((0.5 - math.log(0.5) - 1) + 0.0 + (2 - math.log(2) - 1)) / 3
    assert kl.item() == pytest.approx(expected)
    kl.backward()
    # d/dp of exp(r - p) - (r - p) - 1 is 1 - exp(r - p) = 1 - q/p, over 3 tokens.
    assert torch.allclose(policy.grad, torch.tensor([[(1 - 0.5) / 3, 0.0], [(1 - 2) / 3, 0.0]], dtype=torch.float64))
    at_reference = k3_kl(reference.clone().requires_grad_(True), reference, mask)
    assert at_reference.item() == 0.0


def test_reinforce_value_and_gradient():
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0], dtype=torch.float64)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    loss = reinforce_loss(logprobs, advantages, mask)
    expected = -(0.5 * (-1.0 - 2.0) - 1.0 * (-0.1 - 3.0 - 1.0)) / 5
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.1, -0.1], [0.2, 0.2, 0.2]], dtype=torch.float64))


def test_an_empty_mask_gives_zero_not_nan():
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.zeros(1, 2, dtype=torch.bool)
    advantages = torch.tensor([1.0])
    assert reinforce_loss(logprobs, advantages, mask).item() == 0.0
    assert clipped_surrogate_loss(logprobs, logprobs - 0.1, advantages, mask, 0.2).item() == 0.0
    assert k3_kl(logprobs, logprobs - 0.5, mask).item() == 0.0
