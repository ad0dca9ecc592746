"""LoRA dropout fused into the LoRA A projection: the same dropout, a quarter of the random draws, an eighth of the memory.

peft computes a LoRA branch as B(A(dropout(x))) with `torch.nn.Dropout`. On a CPU that costs, per element of x and
per projection, one Bernoulli draw (a quarter of a training step's time in the paper's setting: dropout 0.1 on all
seven projections of all layers) and eight bytes kept for the backward pass (the float mask and the dropped input
A's weight gradient needs). `DropoutLinear` does the same thing as dropout then A with:
- the keep mask drawn 16 bits an element from 64-bit random integers (four elements a draw), so the drop
  probability is p rounded to a multiple of 2^-15 (0.1 becomes 0.100006);
- only the boolean mask kept (one byte an element); the input itself is already kept for the other projections
  that read it, and the dropped input is rebuilt from the two in the backward pass.
Masks come from torch's default generator, so activation checkpointing replays them and a seed fixes them.
Outside training, or with p = 0, it is A alone, as peft's Identity dropout is.
"""

from __future__ import annotations

import torch

LANE_BITS = 15  # of each 16-bit lane; the top bit of an int64 draw is always 0, so every lane uses 15


def keep_mask(shape: torch.Size, drop_probability: float, device: torch.device) -> torch.Tensor:
    """Bool mask, True with probability 1 - round(p 2^15) / 2^15 per element, from a quarter as many int64 draws."""
    count = shape.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
    lanes = draws.view(torch.int16)[:count] & (2**LANE_BITS - 1)
    return (lanes >= round(drop_probability * 2**LANE_BITS)).view(shape)


class _DropoutLinear(torch.autograd.Function):
    """y = (x * mask / (1 - p)) W^T, keeping x (shared with the layer's other readers), W and the bool mask."""

    @staticmethod
    def forward(ctx, x, weight, drop_probability: float):
        mask = keep_mask(x.shape, drop_probability, x.device)
        scale = 1.0 / (1.0 - drop_probability)
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = scale
        return torch.nn.functional.linear(x * mask * scale, weight)

    @staticmethod
    def backward(ctx, upstream):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (upstream @ weight) * mask * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * mask * ctx.scale).reshape(-1, x.shape[-1])
            grad_weight = upstream.reshape(-1, upstream.shape[-1]).T @ dropped
        return grad_x, grad_weight, None


class DropoutLinear(torch.nn.Linear):
    """A LoRA A projection that applies the branch's dropout itself (`fuse_lora_dropout`)."""

    drop_probability: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_probability > 0:
            return _DropoutLinear.apply(x, self.weight, self.drop_probability)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def fuse_lora_dropout(peft_model) -> int:
    """Move every LoRA branch's dropout into its A projection (the same parameters, names and state dict); returns
    how many branches. Branches with a bias on A (peft never makes one) are left as they are."""
    count = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            projection = module.lora_A[name]
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and type(projection) is torch.nn.Linear and projection.bias is None:
                projection.__class__ = DropoutLinear
                projection.drop_probability = dropout.p
                dropouts[name] = torch.nn.Identity()
                count += 1
    return count
