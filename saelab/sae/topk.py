"""TopK and BatchTopK SAEs: exactly k latents per token, or k per token on average over the batch.

    topk       the k largest pre-activations, ReLU,     L = mse + α AuxK   (Gao et al. 2024)
    batchtopk  the k·batch largest over the batch,      L = mse + α AuxK   (Bussmann et al. 2024);
               a learned threshold θ replaces the batch at inference
"""

from __future__ import annotations

import math

import torch

from saelab.sae.base import SAE, Losses, UntiedSAE, losses_of, register
from saelab.sae.loss import reconstruction_mse, topk_aux_loss


def default_aux_k(d_in: int) -> int:
    """Gao et al. 2024 A.2: k_aux "a power of two close to d_model / 2" (GPT-2 small: 512)."""
    return 2 ** round(math.log2(d_in / 2))


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, then ReLU; the rest are 0. (..., d_sae) -> (..., d_sae)."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


@register("topk")
class TopKSAE(UntiedSAE):
    """h = ReLU(the k largest pre-activations of each token), L = mse + α AuxK (dead latents reconstruct
    the residual x - x_hat from their top-aux_k pre-activations; aux_k 0 = a power of two near d_in / 2)."""

    saelens_architecture = "topk"
    options = ("k", "aux_k", "aux_coefficient")

    def __init__(self, d_in: int, d_sae: int, k: int = 32, aux_k: int = 0, aux_coefficient: float = 1 / 32, **base):
        super().__init__(d_in, d_sae, **base)
        if not (isinstance(k, int) and 0 < k <= d_sae):
            raise ValueError(f"k={k!r} must be an integer between 1 and d_sae={d_sae}")
        self.k, self.aux_k, self.aux_coefficient = k, aux_k, aux_coefficient

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return topk_relu(self.pre_activation(x), self.k)

    def activate_for_training(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu(pre, self.k)

    def loss(self, x, sparsity_coefficient, dead) -> Losses:
        pre = self.pre_activation(x)
        h = self.activate_for_training(pre)
        x_hat = self.decode(h)
        mse = reconstruction_mse(x, x_hat)
        aux = self.aux_coefficient * topk_aux_loss(pre, dead, (x - x_hat).detach(), self.W_dec,
                                                   self.aux_k or default_aux_k(self.d_in))
        return losses_of(mse, mse.new_zeros(()), aux, mse + aux, h)

    def cfg_dict(self) -> dict:
        return super().cfg_dict() | {"k": self.k, "rescale_acts_by_decoder_norm": False}


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training keeps the k·batch largest activations over the whole batch (k per token on average);
    θ, an exponential moving average of the smallest kept activation (rate threshold_lr), then replaces
    the batch: h = ReLU(pre) where pre > θ. Saved as SAELens saves it: a JumpReLU with θ for every latent."""

    saelens_architecture = "jumprelu"
    options = (*TopKSAE.options, "threshold_lr")

    def __init__(self, d_in: int, d_sae: int, k: int = 32, aux_k: int = 0, aux_coefficient: float = 1 / 32,
                 threshold_lr: float = 0.01, **base):
        super().__init__(d_in, d_sae, k=k, aux_k=aux_k, aux_coefficient=aux_coefficient, **base)
        self.threshold_lr = threshold_lr
        # float64 as SAELens keeps it: an average of ~1e5 small updates drifts in float32
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return torch.relu(pre) * (pre > self.threshold)

    def activate_for_training(self, pre: torch.Tensor) -> torch.Tensor:
        h = topk_relu(pre.flatten(), self.k * pre.shape[0]).view_as(pre)  # (batch, d_sae)
        with torch.no_grad():  # no host sync: a batch with nothing kept leaves θ unchanged
            smallest = torch.where(h > 0, h, torch.inf).min().to(self.threshold.dtype)
            moved = torch.lerp(self.threshold, smallest, self.threshold_lr)
            self.threshold.copy_(torch.where(smallest.isfinite(), moved, self.threshold))
        return h

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float64 and self.threshold.device.type != "mps":  # MPS lacks float64
            self.threshold = self.threshold.double()
        return self

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return super().saelens_tensors() | {"threshold": self.threshold.float().expand(self.d_sae)}

    def cfg_dict(self) -> dict:
        cfg = SAE.cfg_dict(self)  # a JumpReLU for SAELens: no k
        cfg["saelab"]["threshold"] = self.threshold.item()  # float64 exactly (JSON floats are doubles)
        return cfg

    def load_tensors(self, tensors, cfg) -> None:
        super().load_tensors(tensors, cfg)
        theta = cfg.get("saelab", {}).get("threshold", tensors["threshold"][0].item())
        self.threshold.fill_(theta)
