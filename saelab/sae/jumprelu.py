"""The JumpReLU SAE: a learned threshold per latent, trained through straight-through estimators.

    jumprelu   pre where pre > θ_f,   L = mse + λ0 E||h||_0   (Rajamanoharan et al. 2024)
"""

from __future__ import annotations

import torch
from torch import nn

from saelab.sae.base import Losses, UntiedSAE, losses_of, register
from saelab.sae.loss import jumprelu, l0_penalty, reconstruction_mse


@register("jumprelu")
class JumpReLUSAE(UntiedSAE):
    """h = pre where pre > θ_f, else 0, with a learned threshold θ_f >= 0 per latent; L = mse + λ0 E||h||_0.
    `bandwidth` is the width ε of the straight-through estimators' kernel, in activation units."""

    saelens_architecture = "jumprelu"
    options = ("bandwidth", "init_threshold")
    sparsity_setting = "l0_coefficient"

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 0.05, init_threshold: float = 0.01, **base):
        super().__init__(d_in, d_sae, **base)
        if not (bandwidth > 0 and init_threshold >= 0):
            raise ValueError(f"bandwidth={bandwidth} must be > 0 and init_threshold={init_threshold} >= 0")
        self.bandwidth, self.init_threshold = bandwidth, init_threshold
        self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return torch.relu(pre) * (pre > self.threshold)  # SAELens' JumpReLUSAE.encode

    def loss(self, x, sparsity_coefficient, dead) -> Losses:
        pre = self.pre_activation(x)
        h = jumprelu(pre, self.threshold, self.bandwidth)
        mse, l0 = reconstruction_mse(x, self.decode(h)), l0_penalty(pre, self.threshold, self.bandwidth)
        return losses_of(mse, l0, mse.new_zeros(()), mse + sparsity_coefficient * l0, h)

    @torch.no_grad()
    def constrain_weights(self) -> None:
        super().constrain_weights()
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return super().saelens_tensors() | {"threshold": self.threshold}
