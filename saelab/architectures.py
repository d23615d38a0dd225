"""The SAE architectures, one class each, registered by name (saelab.sae.register).

    tied       the seed: ReLU, W_dec = W_enc^T,         L = mse + λ E||h||_1            (Cunningham et al. 2023)
    standard   ReLU, own decoder with unit-norm rows,   L = mse + λ E||h||_1            (Bricken et al. 2023)
    topk       the k largest pre-activations, ReLU,     L = mse + α AuxK                 (Gao et al. 2024)
    batchtopk  the k·batch largest over the batch,      L = mse + α AuxK; a learned      (Bussmann et al. 2024)
               threshold θ replaces the batch at inference
    jumprelu   pre where pre > θ_f (θ learned per       L = mse + λ0 E||h||_0           (Rajamanoharan et al. 2024)
               latent through straight-through estimators)

Every untied architecture holds its decoder rows at unit norm: before each step the gradient along
each row is removed, after it rows are renormalised (Bricken et al. 2023, "Towards Monosemanticity"),
so no penalty can be dodged by shrinking h and growing W_dec, and thresholds are in the units of a
unit direction. A new architecture is one class here (plus its tests): the loop only calls `loss`
(or `backward`), the optimizer and `constrain_grads` / `constrain_weights`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saelab.loss import l0_penalty, l1_penalty, reconstruction_mse, rectangle, topk_aux_loss
from saelab.sae import SAE, Losses, register


def _losses(mse: torch.Tensor, sparsity: torch.Tensor, aux: torch.Tensor, total: torch.Tensor,
            h: torch.Tensor) -> Losses:
    h = h.detach()
    return Losses(total=total, mse=mse, sparsity=sparsity, aux=aux, h=h, mass=h.sum(0))


class ReLUWithL1:
    """h = ReLU(pre), L = mse + λ E||h||_1: what the seed's tied SAE and the standard one share."""

    sparsity_setting = "l1_coefficient"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x))

    def loss(self, x, sparsity_coefficient, dead) -> Losses:
        h = self.encode(x)
        mse, l1 = reconstruction_mse(x, self.decode(h)), l1_penalty(h)
        return _losses(mse, l1, mse.new_zeros(()), mse + sparsity_coefficient * l1, h)


@register("tied")
class TiedSAE(ReLUWithL1, SAE):
    """The seed article's SAE: h = ReLU(x W_enc + b_enc), x_hat = h W_enc^T + b_dec, L = mse + λ E||h||_1."""

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.W_enc.t()

    def backward(self, x, sparsity_coefficient, dead, dtype=torch.float32) -> Losses:
        if dtype != torch.float32 or self.apply_b_dec_to_input or torch.is_autocast_enabled(x.device.type):
            return super().backward(x, sparsity_coefficient, dead, dtype)
        return self._exact_grads(x, sparsity_coefficient, augmented=x.device.type == "cpu")

    def _buffer(self, name: str, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """A tensor reused across steps: allocating ~13-20 MB per step cost page faults that slowed the
        CPU step by ~12% (measured: 161 -> 143 ms at 768->6144, batch 512, 2 threads)."""
        work = self.__dict__.setdefault("_work", {})
        key = (name, shape, like.device)
        if key not in work:
            work[key] = like.new_empty(shape)
        return work[key]

    @torch.no_grad()
    def _exact_grads(self, x: torch.Tensor, sparsity_coefficient: torch.Tensor, augmented: bool) -> Losses:
        """The loss above and its gradients written out (equal to autograd, tested):

            h = relu(x W + b_enc),  e = h W^T + b_dec - x,  L = sum(e^2) / (B d) + λ sum(h) / B   (h >= 0)
            g = dL/dx_hat = 2 e / (B d);   q = dL/dpre = (g W + λ / B) where h > 0, else 0
            dL/dW = x^T q + g^T h,   dL/db_enc = sum_B q,   dL/db_dec = sum_B g

        Why by hand: autograd forms the decoder's weight gradient as h^T g and adds its transpose, a
        product in the slow layout on CPU BLAS and an extra pass over W on a GPU; x^T q + g^T h lands
        in W's own layout. On CPU one augmented product also yields db_enc and each latent's L1 mass:
            [x 1 0]^T q + [g 0 1]^T h = [dL/dW ; sum_B q ; sum_B h]            (d_in + 2, d_sae)
        On CUDA that odd width (770) misses the tensor cores' fast kernels: plain GEMMs and two sums there.
        """
        W, (batch, d_in) = self.W_enc, x.shape
        h = torch.addmm(self.b_enc, x, W, out=self._buffer("h", x, batch, self.d_sae)).relu_()  # (B, d_sae)
        e = torch.addmm(self.b_dec, h, W.t()).sub_(x)  # (B, d_in) x_hat - x
        sse = e.pow(2).sum()
        g = e.mul_(2.0 / (batch * d_in))  # reuses e's memory: e is not needed any more
        l1_grad = (sparsity_coefficient / batch).reshape(1)  # d(λ sum(h) / B)/dh, broadcast over (B, d_sae)
        q = torch.addmm(l1_grad, g, W, out=self._buffer("q", x, batch, self.d_sae))
        torch.ops.aten.threshold_backward.grad_input(q, h, 0, grad_input=q)  # q = 0 where h == 0 (ReLU's gradient)
        if augmented:
            xa, ga = self._buffer("xa", x, batch, d_in + 2), self._buffer("ga", x, batch, d_in + 2)
            xa[:, :d_in], xa[:, d_in], xa[:, d_in + 1] = x, 1, 0
            ga[:, :d_in], ga[:, d_in], ga[:, d_in + 1] = g, 0, 1
            out = torch.mm(xa.t(), q, out=self._buffer("grad", x, d_in + 2, self.d_sae)).addmm_(ga.t(), h)
            grad_W, grad_b_enc, mass = out[:d_in], out[d_in], out[d_in + 1]
        else:
            grad_W = torch.mm(x.t(), q, out=self._buffer("grad", x, d_in, self.d_sae)).addmm_(g.t(), h)
            grad_b_enc, mass = q.sum(0), h.sum(0)
        self.W_enc.grad, self.b_enc.grad, self.b_dec.grad = grad_W, grad_b_enc, g.sum(0)
        l1 = mass.sum() / batch
        mse = sse / (batch * d_in)
        return Losses(mse + sparsity_coefficient * l1, mse, l1, mse.new_zeros(()), h, mass)

    def load_tensors(self, tensors, cfg) -> None:
        if not torch.equal(tensors["W_dec"], tensors["W_enc"].t()):
            raise ValueError("cfg.json says the SAE is tied, but W_dec != W_enc^T in the weights file")
        super().load_tensors(tensors, cfg)


class UntiedSAE(SAE):
    """An own decoder W_dec [d_sae, d_in] whose rows are held at unit norm (see the module docstring)."""

    def __init__(self, d_in: int, d_sae: int, **base):
        super().__init__(d_in, d_sae, **base)
        self._add_unit_norm_decoder()

    @torch.no_grad()
    def constrain_grads(self) -> None:
        if self.W_dec.grad is not None:  # rows of W have unit norm: G -= (G . W) W, row by row
            self.W_dec.grad.sub_((self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def constrain_weights(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@register("standard")
class StandardSAE(ReLUWithL1, UntiedSAE):
    """h = ReLU(x W_enc + b_enc), x_hat = h W_dec + b_dec, L = mse + λ E||h||_1 (SAELens' "standard")."""


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
    options = {"k": "topk_k", "aux_k": "aux_k", "aux_coefficient": "aux_coefficient"}

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
        return _losses(mse, mse.new_zeros(()), aux, mse + aux, h)

    def cfg_dict(self) -> dict:
        return super().cfg_dict() | {"k": self.k, "rescale_acts_by_decoder_norm": False}


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training keeps the k·batch largest activations over the whole batch (k per token on average);
    θ, an exponential moving average of the smallest kept activation (rate threshold_lr), then replaces
    the batch: h = ReLU(pre) where pre > θ. Saved as SAELens saves it: a JumpReLU with θ for every latent."""

    saelens_architecture = "jumprelu"
    options = TopKSAE.options | {"threshold_lr": "batchtopk_threshold_lr"}

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


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - θ) forward; backward: to pre where it passed, to θ through the straight-through
    estimator -(θ/ε) K((pre - θ)/ε) (Rajamanoharan et al. 2024, eq. 10)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        ste = threshold / ctx.bandwidth * rectangle((pre - threshold) / ctx.bandwidth) * grad_out
        return (pre > threshold) * grad_out, -ste.sum(0), None


@register("jumprelu")
class JumpReLUSAE(UntiedSAE):
    """h = pre where pre > θ_f, else 0, with a learned threshold θ_f >= 0 per latent; L = mse + λ0 E||h||_0.
    `bandwidth` is the width ε of the straight-through estimators' kernel, in activation units."""

    saelens_architecture = "jumprelu"
    options = {"bandwidth": "jumprelu_bandwidth", "init_threshold": "jumprelu_init_threshold"}
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
        h = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        mse, l0 = reconstruction_mse(x, self.decode(h)), l0_penalty(pre, self.threshold, self.bandwidth)
        return _losses(mse, l0, mse.new_zeros(()), mse + sparsity_coefficient * l0, h)

    @torch.no_grad()
    def constrain_weights(self) -> None:
        super().constrain_weights()
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return super().saelens_tensors() | {"threshold": self.threshold}
