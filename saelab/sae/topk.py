"""TopK and BatchTopK SAEs: exactly k latents per token, or k per token on average over the batch.

    topk       the k largest pre-activations, ReLU,     L = mse + α AuxK   (Gao et al. 2024)
    batchtopk  the k·batch largest over the batch,      L = mse + α AuxK   (Bussmann et al. 2024);
               a learned threshold θ replaces the batch at inference

Training takes the sparse step (`backward`): one dense product (the encoder's pre-activations), then
work in proportion to the kept entries. The kept codes are a list of (token, latent, value) entries;
decoding sums k decoder rows per token (`embedding_bag`), and the gradients reach W_dec, W_enc and b_enc
only through those entries: each weight gradient gathers k rows per token instead of a dense product
(Gao et al. 2024, §5.3 and sparsify's fused encoder do the same). `loss` is the dense reference the
tests hold the sparse step to; `sparse_backward = False` trains on it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from saelab.sae.base import SAE, Losses, UntiedSAE, losses_of, register
from saelab.sae.loss import dead_topk, reconstruction_mse, topk_aux_loss


def default_aux_k(d_in: int) -> int:
    """Gao et al. 2024 A.2: k_aux "a power of two close to d_model / 2" (GPT-2 small: 512)."""
    return 2 ** round(math.log2(d_in / 2))


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, then ReLU; the rest are 0. (..., d_sae) -> (..., d_sae)."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


class Codes(NamedTuple):
    """A batch's kept pre-activations as entries in token order: entry i is token rows[i], latent cols[i].
    The code h is ReLU(values) at those places and 0 elsewhere: the (batch, d_sae) h is never formed."""

    rows: torch.Tensor  # (nnz,) int64, non-decreasing
    cols: torch.Tensor  # (nnz,) int64 latent of each entry
    values: torch.Tensor  # (nnz,) the kept pre-activations (before the ReLU)
    offsets: torch.Tensor  # (batch,) int64 where each token's entries start


def per_token_codes(values: torch.Tensor, cols: torch.Tensor) -> Codes:
    """The same number of entries for every token: values, cols (batch, m) -> Codes."""
    batch, m = values.shape
    tokens = torch.arange(batch, device=values.device)
    return Codes(tokens.repeat_interleave(m), cols.flatten().contiguous(), values.flatten().contiguous(), tokens * m)


def sparse_decode(codes: Codes, weights: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """(batch, d_in): row b = sum over token b's entries i of weights[i] * W_dec[cols[i]]."""
    return F.embedding_bag(codes.cols, W_dec, codes.offsets, mode="sum", per_sample_weights=weights)


def entry_dots(grad: torch.Tensor, bags: torch.Tensor, W_dec: torch.Tensor, codes: Codes) -> torch.Tensor:
    """(nnz,): grad[bags[i]] . W_dec[cols[i]], the gradient of a sparse_decode's weights (grad (bags, d_in))."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, W_dec, codes.cols, codes.offsets,
                                                                     bags, 0)


def rows_gradient(d_sae: int, cols: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor,
                  bags: torch.Tensor, capturable: bool) -> torch.Tensor:
    """(d_sae, d): row f = sum over entries i with cols[i] = f of weights[i] * dense[bags[i]], i.e. S^T D for
    the sparse S (weights at (bags, cols)): a weight gradient in work proportional to the entries.
    capturable (CUDA): index_add_, atomic adds and no host sync, so the step stays capturable. Else
    embedding_bag's own backward (sorted, one pass; on CPU index_add_ cost more than the dense product)."""
    if capturable:
        return dense.new_zeros(d_sae, dense.shape[1]).index_add_(0, cols, dense[bags] * weights[:, None])
    none = torch.empty(0, dtype=torch.int64, device=dense.device)
    return torch.ops.aten._embedding_bag_dense_backward(dense, cols, bags, none, none, d_sae, False, 0, weights)


@register("topk")
class TopKSAE(UntiedSAE):
    """h = ReLU(the k largest pre-activations of each token), L = mse + α AuxK (dead latents reconstruct
    the residual x - x_hat from their top-aux_k pre-activations; aux_k 0 = a power of two near d_in / 2)."""

    saelens_architecture = "topk"
    options = ("k", "aux_k", "aux_coefficient")
    sparse_backward = True  # False: train on the dense reference `loss` (autograd), e.g. to compare

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

    def keep(self, pre: torch.Tensor) -> Codes:
        """The entries training keeps of pre (batch, d_sae): each token's k largest."""
        top = pre.topk(self.k, dim=-1, sorted=False)
        return per_token_codes(top.values, top.indices)

    def backward(self, x, sparsity_coefficient, dead, dtype=torch.float32) -> Losses:
        if (not self.sparse_backward or dtype in (torch.bfloat16, torch.float16) or self.apply_b_dec_to_input
                or torch.is_autocast_enabled(x.device.type)):
            return super().backward(x, sparsity_coefficient, dead, dtype)
        return self._sparse_grads(x, dead, capturable=x.device.type != "cpu")

    @torch.no_grad()
    def _sparse_grads(self, x: torch.Tensor, dead: torch.Tensor, capturable: bool) -> Losses:
        """`loss` and its gradients in work proportional to the kept entries (equal to autograd, tested):

            pre = x W_enc + b_enc;  z = ReLU(kept pre);  x_hat = sum_i z_i W_dec[col_i] + b_dec
            g = dL/dx_hat = 2 (x_hat - x) / (B d);  AuxK (dead latents' entries a) adds g_a = 2 α (e_hat - e) / (B d)
            dL/dpre_i = (g_row . W_dec[col_i]) [z_i > 0]     for every kept and every AuxK entry
            dL/dW_dec[f] = sum_{i: col_i = f} z_i g_row,   dL/dW_enc[:, f] = sum_{i: col_i = f} dL/dpre_i x_row,
            dL/db_enc[f] = sum_{i: col_i = f} dL/dpre_i,    dL/db_dec = sum_B g

        Losses.h is z, the kept values (nnz,): count_nonzero(h) / batch is L0 as for a dense h.
        capturable (CUDA): no host sync anywhere, as the captured step needs (see rows_gradient, dead_topk).
        """
        batch, d_in = x.shape
        pre = torch.addmm(self.b_enc, x, self.W_enc)  # (B, d_sae): the one dense product
        codes = self.keep(pre)
        z = codes.values.relu()
        e = sparse_decode(codes, z, self.W_dec).add_(self.b_dec).sub_(x)  # (B, d_in) x_hat - x
        mse = e.pow(2).mean()
        aux, aux_codes, aux_z, g_aux = self._aux(pre, dead, e, capturable)
        g = e.mul_(2.0 / (batch * d_in))  # reuses e's memory
        del pre  # nothing of size (B, d_sae) is kept for the gradients
        if aux_codes is None:  # no dead latent: the kept entries alone
            cols, weights, bags, grads = codes.cols, z, codes.rows, g
            dpre = entry_dots(g, bags, self.W_dec, codes)
        else:  # AuxK's entries after the kept ones; their bags index g_aux, stacked below g
            cols, weights = torch.cat([codes.cols, aux_codes.cols]), torch.cat([z, aux_z])
            bags, grads = torch.cat([codes.rows, aux_codes.rows + batch]), torch.cat([g, g_aux])
            dpre = torch.cat([entry_dots(g, codes.rows, self.W_dec, codes),
                              entry_dots(g_aux, aux_codes.rows, self.W_dec, aux_codes)])
        dpre.mul_(weights > 0)  # ReLU's gradient (and AuxK's masked, -inf entries get none)
        tokens = bags if aux_codes is None else torch.cat([codes.rows, aux_codes.rows])
        self.W_dec.grad = rows_gradient(self.d_sae, cols, weights, grads, bags, capturable)
        self.W_enc.grad = rows_gradient(self.d_sae, cols, dpre, x, tokens, capturable).t().contiguous()  # [d_in, d_sae]
        self.b_enc.grad = dpre.new_zeros(self.d_sae).index_add_(0, cols, dpre)
        self.b_dec.grad = g.sum(0)
        mass = z.new_zeros(self.d_sae).index_add_(0, codes.cols, z)
        return Losses(mse + aux, mse, mse.new_zeros(()), aux, z, mass)

    def _aux(self, pre: torch.Tensor, dead: torch.Tensor, e: torch.Tensor, capturable: bool):
        """AuxK (loss.topk_aux_loss) on the entries of loss.dead_topk: (α AuxK, its Codes, their ReLU
        values, its gradient (B, d_in) with respect to e_hat), or (0, None, None, None) when nothing is dead."""
        found = dead_topk(pre, dead, self.aux_k or default_aux_k(self.d_in), capturable)
        if found is None:
            return e.new_zeros(()), None, None, None
        values, cols, factor = found  # factor: dead.any() on CUDA (no host sync), else 1
        codes = per_token_codes(values, cols)
        aux_z = codes.values.relu()  # ReLU(-inf) = 0: masked entries weigh nothing
        miss = sparse_decode(codes, aux_z, self.W_dec).add_(e)  # e_hat - (x - x_hat): the residual is detached
        aux = self.aux_coefficient * factor * miss.pow(2).mean()
        return aux, codes, aux_z, miss.mul_(self.aux_coefficient * factor * 2.0 / miss.numel())

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
        self._move_threshold(h)
        return h

    def keep(self, pre: torch.Tensor) -> Codes:
        """The k·batch largest entries of pre (batch, d_sae), in token order: a token keeps from 0 to d_sae."""
        batch, d_sae = pre.shape
        flat = pre.flatten().topk(self.k * batch, sorted=False).indices.sort().values  # token order
        rows = flat.div(d_sae, rounding_mode="floor")
        codes = Codes(rows, flat - rows * d_sae, pre.flatten()[flat],
                      torch.searchsorted(rows, torch.arange(batch, device=pre.device)))  # no host sync
        self._move_threshold(codes.values.relu())
        return codes

    @torch.no_grad()
    def _move_threshold(self, h: torch.Tensor) -> None:
        """θ moves toward the batch's smallest positive kept activation. No host sync: a batch with
        nothing kept leaves θ unchanged."""
        smallest = torch.where(h > 0, h, torch.inf).min().to(self.threshold.dtype)
        moved = torch.lerp(self.threshold, smallest, self.threshold_lr)
        self.threshold.copy_(torch.where(smallest.isfinite(), moved, self.threshold))

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
