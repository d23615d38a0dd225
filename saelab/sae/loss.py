"""The losses every architecture trains on, as pure functions; each docstring is the formula.

An architecture's `loss` (saelab.sae.relu, .topk, .jumprelu) is a sum of these, so this file says what is
optimised. The seed's loss is  L = ||x - x_hat||^2 + λ ||h||_1  with λ = 1e-3, where, as in
Cunningham et al.'s code (`(x_hat - x).pow(2).mean()`), the squared error is averaged over batch
*and* d_in, and the L1 norm is summed over features and averaged over the batch. SAELens sums the
squared error over d_in instead, so its loss is d_in times ours: the same optimum there needs
l1_coefficient_saelens = d_in · λ (GPT-2: 768 · 1e-3 = 0.768; SAELens also weights each latent's L1 by
||W_dec[f]||, which is 1 here: every untied architecture holds its decoder rows at unit norm).
"""

from __future__ import annotations

import torch


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """mean over batch and d_in of (x - x_hat)^2  =  E_batch ||x - x_hat||^2 / d_in.

    x, x_hat: (batch, d_in) -> scalar.
    """
    return (x_hat - x).pow(2).mean()


def l1_penalty(h: torch.Tensor) -> torch.Tensor:
    """E_batch ||h||_1 = mean over batch of the sum over d_sae of |h|.

    h: (batch, d_sae) -> scalar.
    """
    return h.abs().sum(dim=-1).mean()


def topk_aux_loss(pre: torch.Tensor, dead: torch.Tensor, residual: torch.Tensor, W_dec: torch.Tensor,
                  aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024, A.2): reconstruct the main residual e = x - x_hat from the top-k_aux
    pre-activations among *dead* latents, z = ReLU(topk_dead(pre)), and return

        mean over batch and d_in of (e - z W_dec)^2,   or 0 when no latent is dead.

    pre: (batch, d_sae), dead: (d_sae,) bool, residual: (batch, d_in) (detached), W_dec: (d_sae, d_in).
    Live latents are masked to -inf, so fewer than aux_k dead latents need no host sync.
    """
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(min(aux_k, pre.shape[-1]), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())  # ReLU(-inf) = 0
    loss = reconstruction_mse(residual, z @ W_dec)
    return loss * dead.any()


def dead_topk(pre: torch.Tensor, dead: torch.Tensor, aux_k: int, capturable: bool):
    """AuxK's entries, for a sparse step: each token's top-aux_k pre-activations among dead latents, as
    (values, latents, factor), values and latents (batch, m); the term is factor * the loss above with
    z = ReLU(values) at those latents. Or None when no latent is dead.

    capturable (CUDA): live latents masked to -inf as above, m = min(aux_k, d_sae), factor = dead.any(): no
    host sync, so the step can be captured. Else (CPU, where a host sync costs nothing) only the dead
    latents are searched (m = min(aux_k, number dead)) and factor = 1: what it leaves out are the entries
    the -inf mask gives weight 0, so the term and its gradients are the same.
    """
    batch = pre.shape[0]
    if capturable:
        top = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, pre.shape[-1]), dim=-1, sorted=False)
        return top.values, top.indices, dead.any().to(pre.dtype)
    latents = dead.nonzero().squeeze(1)  # (number dead,)
    if latents.numel() == 0:
        return None
    among = pre.index_select(1, latents)  # (batch, number dead)
    if latents.numel() <= aux_k:
        return among, latents.expand(batch, -1), 1.0
    top = among.topk(aux_k, dim=-1, sorted=False)
    return top.values, latents[top.indices], 1.0


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The kernel of the straight-through estimator below: 1 where |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class _StepSTE(torch.autograd.Function):
    """H(pre - θ) forward; backward d/dθ = -(1/ε) K((pre - θ)/ε), and no gradient to pre: the one
    straight-through estimator of JumpReLU (Rajamanoharan et al. 2024, eqs. 10-11)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        ste = rectangle((pre - threshold) / ctx.bandwidth) * grad_out / ctx.bandwidth
        return None, -ste.sum(0), None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """pre · H(pre - θ) (batch, d_sae), with gradients H to pre and -(θ/ε) K((pre - θ)/ε) to θ
    (Rajamanoharan et al. 2024, eq. 10). The second term is 0 forward (H_ste equals the gate) and
    carries, through the one estimator `_StepSTE`, θ times its gradient to θ."""
    step = _StepSTE.apply(pre, threshold, bandwidth)
    gate = step.detach()
    return pre * gate + threshold.detach() * (step - gate)


def l0_penalty(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """E_batch ||h||_0 = mean over batch of the number of latents with pre > θ (JumpReLU's sparsity).

    Its gradient reaches only θ, through the straight-through estimator with a rectangle kernel of
    width `bandwidth` (Rajamanoharan et al. 2024, §4). pre: (batch, d_sae), threshold: (d_sae,).
    """
    return _StepSTE.apply(pre, threshold, bandwidth).sum(dim=-1).mean()
