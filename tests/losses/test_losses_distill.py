import math

import pytest
import torch

from spearfl.losses.common import masked_mean
from spearfl.losses.distill import (
    DIVERGENCES,
    distillation_loss,
    token_jsd,
    token_kl,
    token_reverse_kl,
)


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


# ---------------------------------------------------------------------------------------------- reverse KL and JSD


def mixture_entropy(beta):
    """-beta ln beta - (1 - beta) ln(1 - beta): the generalised JSD's maximum, reached on disjoint supports."""
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


def test_reverse_kl_runs_from_student_to_teacher_and_is_zero_for_equal_rows():
    teacher = log([[[0.5, 0.5], [0.9, 0.1]]])  # [1, 2, 2]
    student = log([[[0.25, 0.75], [0.9, 0.1]]])
    # KL([1/4, 3/4] || [1/2, 1/2]) = 1/4 ln(1/2) + 3/4 ln(3/2); equal rows give 0.
    expected = torch.tensor([[0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0]])
    assert torch.allclose(token_reverse_kl(teacher, student), expected, atol=1e-6)
    logprobs = torch.log_softmax(torch.randn(3, 4, 1000, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert torch.allclose(token_reverse_kl(logprobs, logprobs), torch.zeros(3, 4), atol=1e-6)


def test_jsd_matches_hand_values_at_two_betas():
    teacher = log([[[0.5, 0.5]]])
    student = log([[[0.25, 0.75]]])
    # beta 1/2: M = [3/8, 5/8]
    kl_teacher = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    kl_student = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    assert token_jsd(teacher, student, 0.5).item() == pytest.approx(0.5 * kl_teacher + 0.5 * kl_student, abs=1e-6)
    # beta 1/4: M = 1/4 [1/2, 1/2] + 3/4 [1/4, 3/4] = [5/16, 11/16]
    kl_teacher = 0.5 * math.log(0.5 / (5 / 16)) + 0.5 * math.log(0.5 / (11 / 16))
    kl_student = 0.25 * math.log(0.25 / (5 / 16)) + 0.75 * math.log(0.75 / (11 / 16))
    assert token_jsd(teacher, student, 0.25).item() == pytest.approx(0.25 * kl_teacher + 0.75 * kl_student, abs=1e-6)


def test_jsd_is_symmetric_at_one_half_and_not_otherwise():
    generator = torch.Generator().manual_seed(2)
    first, second = (torch.log_softmax(torch.randn(2, 3, 50, generator=generator), dim=-1) for _ in range(2))
    assert torch.allclose(token_jsd(first, second, 0.5), token_jsd(second, first, 0.5), atol=1e-6)
    # swapping the roles is the same as swapping beta for 1 - beta
    assert torch.allclose(token_jsd(first, second, 0.2), token_jsd(second, first, 0.8), atol=1e-6)
    assert not torch.allclose(token_jsd(first, second, 0.2), token_jsd(second, first, 0.2), atol=1e-3)


def test_jsd_lies_between_zero_and_the_entropy_of_beta_reached_on_disjoint_supports():
    generator = torch.Generator().manual_seed(3)
    teacher, student = (torch.log_softmax(3 * torch.randn(4, 5, 20, generator=generator), dim=-1) for _ in range(2))
    for beta in (0.1, 0.5, 0.9):
        values = token_jsd(teacher, student, beta)
        assert bool((values > 0).all()) and bool((values < mixture_entropy(beta)).all()), beta
        assert torch.allclose(token_jsd(teacher, teacher, beta), torch.zeros(4, 5), atol=1e-6)
    # no token in common: ln 2 at beta 1/2; zero-probability tokens (log 0 = -inf) on either side cost nothing
    disjoint_teacher, disjoint_student = log([[[1.0, 0.0, 0.0]]]), log([[[0.0, 0.5, 0.5]]])
    for beta in (0.5, 0.3):
        value = token_jsd(disjoint_teacher, disjoint_student, beta).item()
        assert value == pytest.approx(mixture_entropy(beta), abs=1e-6)
    assert mixture_entropy(0.5) == pytest.approx(math.log(2))


def test_jsd_stays_finite_where_probabilities_underflow():
    teacher = torch.tensor([[[0.0, -200.0, -400.0]]])  # exp(-400) is 0 in float32; the log-space mixture is not
    student = torch.tensor([[[-300.0, 0.0, -1000.0]]])
    value = token_jsd(teacher, student, 0.5)
    assert torch.isfinite(value).all() and value.item() == pytest.approx(math.log(2), abs=1e-6)


def test_every_divergence_sends_gradient_to_the_student_only_and_reverse_kl_and_jsd_match_hand_gradients():
    teacher = log([[[0.5, 0.25, 0.25]]]).requires_grad_(True)
    student_probs = [0.2, 0.3, 0.5]
    mask = torch.tensor([[True]])
    for name in DIVERGENCES:
        student_logits = log([[student_probs]]).requires_grad_(True)
        distillation_loss(teacher, student_logits, mask, name, 0.5).backward()
        assert teacher.grad is None, name
        assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0, name
    # reverse KL: d/d logit_j = s_j (ln(s_j / t_j) - KL(s || t))
    teacher_probs = [0.5, 0.25, 0.25]
    reverse = sum(s * math.log(s / t) for s, t in zip(student_probs, teacher_probs))
    expected = [s * (math.log(s / t) - reverse) for s, t in zip(student_probs, teacher_probs)]
    student_logits = log([[student_probs]]).requires_grad_(True)
    distillation_loss(teacher, student_logits, mask, "reverse_kl").backward()
    assert torch.allclose(student_logits.grad, torch.tensor([[expected]]), atol=1e-6)
    # JSD_beta: d/d s_i = (1 - beta) ln(s_i / m_i), through the softmax: s_j (g_j - sum_i s_i g_i)
    beta = 0.3
    mixture = [beta * t + (1 - beta) * s for s, t in zip(student_probs, teacher_probs)]
    g = [(1 - beta) * math.log(s / m) for s, m in zip(student_probs, mixture)]
    mean_g = sum(s * gi for s, gi in zip(student_probs, g))
    expected = [s * (gi - mean_g) for s, gi in zip(student_probs, g)]
    student_logits = log([[student_probs]]).requires_grad_(True)
    distillation_loss(teacher, student_logits, mask, "jsd", beta).backward()
    assert torch.allclose(student_logits.grad, torch.tensor([[expected]]), atol=1e-6)


def test_distillation_loss_picks_the_divergence_and_masks_tokens_for_each():
    teacher = log([[[0.5, 0.5], [0.9, 0.1]]])
    student_logits = log([[[0.25, 0.75], [0.5, 0.5]]])
    mask = torch.tensor([[True, False]])  # the second position is padding
    student = torch.log_softmax(student_logits, dim=-1)
    assert distillation_loss(teacher, student_logits, mask).item() == pytest.approx(token_kl(teacher, student)[0, 0].item())
    expected = {
        "forward_kl": math.log(2) - 0.5 * math.log(3),
        "reverse_kl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        "jsd": 0.25 * (0.5 * math.log(0.5 / (5 / 16)) + 0.5 * math.log(0.5 / (11 / 16)))  # beta 1/4, as above
        + 0.75 * (0.25 * math.log(0.25 / (5 / 16)) + 0.75 * math.log(0.75 / (11 / 16))),
    }
    for name, value in expected.items():
        assert distillation_loss(teacher, student_logits, mask, name, 0.25).item() == pytest.approx(value, abs=1e-6), name
