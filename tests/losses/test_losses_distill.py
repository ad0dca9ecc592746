import math

import pytest
import torch

from spearfl.losses.common import masked_mean
from spearfl.losses.distill import distillation_loss, token_kl


def log(values):
    return torch.log(torch.tensor(values, dtype=torch.float32))


def test_token_kl_matches_hand_values_and_runs_from_teacher_to_student():
    teacher = log([[[0.5, 0.5], [0.9, 0.1]]])  # [1, 2, 2]
    student = log([[[0.25, 0.75], [0.9, 0.1]]])
    # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3) = ln 2 - 1/2 ln 3; equal rows give 0.
    expected = torch.tensor([[math.log(2) - 0.5 * math.log(3), 0.0]])
    assert torch.allclose(token_kl(teacher, student), expected, atol=1e-6)
    # The other direction, KL(student || teacher) = 1/4 ln(1/2) + 3/4 ln(3/2), is another number.
    reverse = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert token_kl(student, teacher)[0, 0].item() == pytest.approx(reverse, abs=1e-6)
    assert abs(reverse - expected[0, 0].item()) > 0.01


def test_token_kl_is_zero_for_equal_distributions_over_a_large_vocabulary():
    logprobs = torch.log_softmax(torch.randn(3, 4, 1000, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.allclose(token_kl(logprobs, logprobs), torch.zeros(3, 4), atol=1e-6)


def test_tokens_the_teacher_rules_out_cost_nothing_even_at_minus_infinity():
    teacher = log([[[1.0, 0.0, 0.0]]])  # log 0 = -inf
    student_logits = log([[[0.5, 0.25, 0.25]]]).requires_grad_(True)
    loss = distillation_loss(teacher, student_logits, torch.tensor([[True]]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # 1 * ln(1 / 0.5)
    loss.backward()
    # d KL / d student logits = softmax(student) - teacher
    assert torch.allclose(student_logits.grad, torch.tensor([[[-0.5, 0.25, 0.25]]]), atol=1e-6)


def test_masked_mean_averages_over_the_masked_tokens_of_the_whole_batch():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, 8.0, 16.0]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 8) / 3)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_distillation_loss_is_the_token_mean_of_kl_and_its_gradient_skips_padding():
    teacher = log([[[0.5, 0.5], [0.9, 0.1]], [[1.0, 0.0], [0.2, 0.8]]])  # [2, 2, 2]; row 0 position 0 is padding
    student_logits = log([[[0.1, 0.9], [0.25, 0.75]], [[0.5, 0.5], [0.2, 0.8]]]).requires_grad_(True)
    mask = torch.tensor([[False, True], [True, True]])
    loss = distillation_loss(teacher, student_logits, mask)
    kl_row0 = 0.9 * math.log(0.9 / 0.25) + 0.1 * math.log(0.1 / 0.75)
    kl_row1 = math.log(1 / 0.5)
    assert loss.item() == pytest.approx((kl_row0 + kl_row1 + 0.0) / 3, abs=1e-6)
    loss.backward()
    gradient = student_logits.grad
    assert torch.equal(gradient[0, 0], torch.zeros(2))  # padding: no gradient
    assert torch.allclose(gradient[0, 1], torch.tensor([0.25 - 0.9, 0.75 - 0.1]) / 3, atol=1e-6)
    assert torch.allclose(gradient[1, 1], torch.zeros(2), atol=1e-6)  # already equal to the teacher
