"""ReLU SAEs with an L1 penalty: the seed's tied SAE and the standard (untied) one.

    tied       ReLU, W_dec = W_enc^T,                   L = mse + λ E||h||_1   (Cunningham et al. 2023)
    standard   ReLU, own decoder with unit-norm rows,   L = mse + λ E||h||_1   (Bricken et al. 2023)
"""

from __future__ import annotations

import torch

from saelab.sae.base import SAE, Losses, UntiedSAE, losses_of, register
from saelab.sae.loss import l1_penalty, reconstruction_mse


class ReLUWithL1:
    """h = ReLU(pre), L = mse + λ E||h||_1: what the seed's tied SAE and the standard one share."""

    sparsity_setting = "l1_coefficient"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x))

    def loss(self, x, sparsity_coefficient, dead) -> Losses:
        h = self.encode(x)
        mse, l1 = reconstruction_mse(x, self.decode(h)), l1_penalty(h)
        return losses_of(mse, l1, mse.new_zeros(()), mse + sparsity_coefficient * l1, h)


@register("tied")
class TiedSAE(ReLUWithL1, SAE):
    """The seed article's SAE: h = ReLU(x W_enc + b_enc), x_hat = h W_enc^T + b_dec, L = mse + λ E||h||_1."""

    # How `backward` forms the weight gradient: "one_gemm" (one product gives dW, db_enc and the L1 mass) or
    # "two_gemms" (x^T q, then g^T h accumulated onto it), the earlier step, kept selectable so that one GPU
    # run can time both (benchmarks/train.py, trainer saelab-two-gemms). Both are exact.
    weight_gradient: str = "one_gemm"

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.W_enc.t()

    def backward(self, x, sparsity_coefficient, dead, dtype=torch.float32) -> Losses:
        native = dtype == self.W_enc.dtype  # float32 (or float64, as the tests run it)
        if self.apply_b_dec_to_input or torch.is_autocast_enabled(x.device.type) or not (
                native or dtype == torch.bfloat16):
            return super().backward(x, sparsity_coefficient, dead, dtype)
        if self.weight_gradient == "two_gemms":
            if not native:  # the earlier step had no bfloat16 of its own: autocast, as before
                return super().backward(x, sparsity_coefficient, dead, dtype)
            return self._exact_grads(x, sparsity_coefficient, augmented=x.device.type == "cpu")
        if self.weight_gradient != "one_gemm":
            raise ValueError(f"weight_gradient={self.weight_gradient!r}: choose 'one_gemm' or 'two_gemms'")
        return self._one_gemm_grads(x, sparsity_coefficient, dtype)

    def _buffer(self, name: str, like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor reused across steps: allocating ~13-20 MB per step cost page faults that slowed the
        CPU step by ~12% (measured: 161 -> 143 ms at 768->6144, batch 512, 2 threads)."""
        work = self.__dict__.setdefault("_work", {})
        dtype = dtype or like.dtype
        key = (name, shape, like.device, dtype)
        if key not in work:
            work[key] = like.new_empty(shape, dtype=dtype)
        return work[key]

    def _stacked_operand(self, like: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The left operand of the one weight-gradient GEMM, (d_in + pad, 2 batch), batch contiguous:

            [ x^T   g^T ]   d_in rows, refilled every step
            [ 1...1 0..0]   -> sum_B q  = dL/db_enc
            [ 0...0 1..1]   -> sum_B h  = each latent's L1 mass
            [ 0 ...   0 ]   padding to a multiple of 16 rows, so the product keeps tensor-core alignment

        The constant rows are written once, when the buffer is made."""
        rows = -(-(self.d_in + 2) // 16) * 16
        work = self.__dict__.setdefault("_work", {})
        key = ("stacked", (rows, 2 * batch), like.device, dtype)
        if key not in work:
            a = like.new_zeros((rows, 2 * batch), dtype=dtype)
            a[self.d_in, :batch], a[self.d_in + 1, batch:] = 1, 1
            work[key] = a
        return work[key]

    def _constants(self, like: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, terms): scale = [1/2, 1/B] turns [e.g, sum(mass)] into [mse, E||h||_1]; terms is the (4,)
        buffer the step's scalars live in, [total, mse, sparsity, aux], its aux slot always 0. Made with fill
        kernels once (no host copy), so a step's scalars cost four small kernels."""
        work = self.__dict__.setdefault("_work", {})
        key = ("constants", batch, like.device, like.dtype)
        if key not in work:
            scale = like.new_empty(2, dtype=torch.float32 if like.dtype == torch.bfloat16 else like.dtype)
            scale[0], scale[1] = 0.5, 1.0 / batch
            work[key] = (scale, scale.new_zeros(4))
        return work[key]

    @torch.no_grad()
    def _one_gemm_grads(self, x: torch.Tensor, sparsity_coefficient: torch.Tensor, dtype: torch.dtype) -> Losses:
        """The gradients of `_exact_grads` with one product for the weight gradient (equal to it, tested):

            dL/dW = x^T q + g^T h = [x^T  g^T] [q; h]          K = 2B: one GEMM instead of two with a β=1 accumulate

        with q and h written into one (2B, d_sae) buffer and the left operand stored batch-contiguous
        (`_stacked_operand`): for TF32, Hopper's tensor-core instructions (wgmma) take float32 operands only
        K-major from shared memory (PTX ISA, wgmma "matrix descriptors": transposes for 16-bit types only),
        so products whose K is the batch with both operands batch-strided (x^T q, g^T h) fall back to sm80
        kernels. Two ones-rows give db_enc and the L1 mass in the same product. Epilogues: bias + ReLU in
        the encoder GEMM (`torch._addmm_activation`), and λ/B as a (d_sae,) bias of the q GEMM.

        dtype bfloat16 (written out, not autocast): the float32 W stays Adam's master copy; each step casts W
        to a bfloat16 copy, codes h and q are bfloat16, x_hat, e and g float32, and the weight-gradient GEMM
        accumulates into float32 (`out_dtype` on CUDA; float32 operands elsewhere).
        """
        W, (batch, d_in) = self.W_enc, x.shape
        low = dtype == torch.bfloat16
        W_c = self._buffer("W", W, d_in, self.d_sae, dtype=dtype).copy_(W) if low else W  # (d_in, d_sae)
        x_c = self._buffer("x", x, batch, d_in, dtype=dtype).copy_(x) if low else x
        b_enc = self._buffer("b_enc", W, self.d_sae, dtype=dtype).copy_(self.b_enc) if low else self.b_enc
        qh = self._buffer("qh", x, 2 * batch, self.d_sae, dtype=dtype)  # [q; h]
        q, h = qh[:batch], qh[batch:]
        torch._addmm_activation(b_enc, x_c, W_c, out=h)  # h = relu(x W + b_enc): (B, d_sae)
        e = self._buffer("e", x, batch, d_in, dtype=W.dtype)
        if low:  # bfloat16 operands, float32 result
            _mm_float32(h, W_c.t(), e).add_(self.b_dec)
        else:  # b_dec in the GEMM's bias epilogue
            torch.addmm(self.b_dec, h, W.t(), out=e)
        e.sub_(x)  # x_hat - x: (B, d_in), float32
        g = torch.mul(e, 2.0 / (batch * d_in), out=self._buffer("g", x, batch, d_in, dtype=W.dtype))  # dL/dx_hat
        g_c = self._buffer("g_c", x, batch, d_in, dtype=dtype).copy_(g) if low else g
        l1_grad = torch.div(sparsity_coefficient.expand(self.d_sae), batch,
                            out=self._buffer("l1_grad", W, self.d_sae, dtype=dtype))  # d(λ sum(h) / B)/dh
        torch.addmm(l1_grad, g_c, W_c, out=q)  # g W + λ/B: (B, d_sae)
        torch.ops.aten.threshold_backward.grad_input(q, h, 0, grad_input=q)  # q = 0 where h == 0 (ReLU's gradient)
        a = self._stacked_operand(x, batch, dtype)
        a[:d_in, :batch].copy_(x_c.t())
        a[:d_in, batch:].copy_(g_c.t())
        out = _mm_float32(a, qh, self._buffer("grad", W, a.shape[0], self.d_sae))  # (d_in + pad, d_sae)
        grad_W, grad_b_enc, mass = out[:d_in], out[d_in], out[d_in + 1]
        self.W_enc.grad, self.b_enc.grad, self.b_dec.grad = grad_W, grad_b_enc, g.sum(0)
        scale, terms = self._constants(x, batch)
        raw = self._buffer("raw", W, 2)
        torch.dot(e.view(-1), g.view(-1), out=raw[0])  # = 2 mse
        torch.sum(mass, 0, out=raw[1])
        torch.mul(raw, scale, out=terms[1:3])  # [mse, E||h||_1]
        torch.addcmul(terms[1], sparsity_coefficient, terms[2], out=terms[0])  # mse + λ E||h||_1
        return Losses(terms[0], terms[1], terms[2], terms[3], h, mass)

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


@register("standard")
class StandardSAE(ReLUWithL1, UntiedSAE):
    """h = ReLU(x W_enc + b_enc), x_hat = h W_dec + b_dec, L = mse + λ E||h||_1 (SAELens' "standard")."""


def _mm_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b accumulated in out's dtype: bfloat16 operands into a float32 result on CUDA (cuBLAS'
    out_dtype), as float32 operands elsewhere (the CPU has no mixed-precision mm)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
