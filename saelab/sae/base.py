"""The sparse autoencoder: a base class every architecture extends, a registry of them, and files.

    pre   = x @ W_enc + b_enc                      W_enc [d_in, d_sae]
    h     = activation(pre)  >= 0                  ReLU, TopK, BatchTopK or JumpReLU (the architecture's)
    x_hat = h @ W_dec + b_dec                      W_dec [d_sae, d_in]; tied (the seed): W_dec = W_enc^T

An architecture (saelab.sae.relu, .topk, .jumprelu) is a subclass registered by name that owns its `encode`,
its `loss` (a `Losses` of named terms built from saelab.loss) and its decoder constraint; the
training loop asks it and never branches on which one it has. Every untied architecture holds its
decoder rows at unit norm (`UntiedSAE`): before each step the gradient along each row is removed, after
it rows are renormalised (Bricken et al. 2023), so no penalty can be dodged by shrinking h and growing
W_dec, and thresholds are in the units of a unit direction. `sae_for(name, d_in, d_sae, **options)`
builds one; `SAE(d_in, d_sae)` is the seed's tied SAE. Names and shapes follow SAELens, so `save`
writes a folder that `sae_lens.SAE.load_from_disk` reads (cfg.json + sae_weights.safetensors) in
SAELens' own format for that architecture, and `SAE.load` reads SAELens folders back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
FORMAT_VERSION = 2  # saelab's keys in cfg.json; version 1 (tied flag, no architecture name) still loads
REGISTRY: dict[str, type[SAE]] = {}


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (batch, d_in) reconstruction
    h: torch.Tensor  # (batch, d_sae) feature activations, >= 0


class Losses(NamedTuple):
    """One training step's loss terms, each a scalar, for a batch x (batch, d_in)."""

    total: torch.Tensor  # what is differentiated: mse + coefficient * sparsity + aux terms
    mse: torch.Tensor  # loss.reconstruction_mse(x, x_hat)
    sparsity: torch.Tensor  # the penalty before its coefficient: E||h||_1, E||h||_0, or 0 (TopK)
    aux: torch.Tensor  # the auxiliary loss after its coefficient (AuxK), or 0
    h: torch.Tensor  # (batch, d_sae) the codes used in training, detached; a sparse step (TopK) gives only the
    #                  kept values (nnz,): count_nonzero(h) / batch is the L0 either way
    mass: torch.Tensor  # (d_sae,) sum of h over the batch: > 0 exactly for the latents that fired

    def detach(self) -> Losses:
        return Losses(*(t.detach() for t in self))


def register(name: str):
    """Class decorator: make an architecture available to `sae_for`, profiles and `SAE.load` by name."""
    def add(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        REGISTRY[name] = cls
        return cls
    return add


def architecture_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def sae_for(architecture: str, d_in: int, d_sae: int, **options) -> SAE:
    """A fresh SAE of a registered architecture; `options` are that architecture's (e.g. k for topk)."""
    if architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {architecture_names()}")
    cls = REGISTRY[architecture]
    stray = set(options) - set(cls.options) - {"metadata", "apply_b_dec_to_input"}
    if stray:
        owners = {o: [n for n, c in REGISTRY.items() if o in c.options] for o in sorted(stray)}
        raise ValueError(f"{architecture} takes the options {sorted(cls.options) or 'none'}; "
                         + "; ".join(f"{o!r} belongs to {owners[o] or 'no architecture'}" for o in owners))
    return cls(d_in, d_sae, **options)


class SAE(nn.Module):
    """The base of every architecture: parameters, decode, files. `SAE(d_in, d_sae)` is the seed's tied SAE."""

    architecture: ClassVar[str] = ""  # set by @register
    saelens_architecture: ClassVar[str] = "standard"  # the SAELens class this saves as
    options: ClassVar[tuple[str, ...]] = ()  # the keyword options it takes, each a field of saelab.config.SAEConfig
    sparsity_setting: ClassVar[str | None] = None  # the TrainConfig field of the coefficient `loss` takes

    def __new__(cls, *args, **kwargs):
        if cls is SAE:  # SAE(d_in, d_sae) stays the seed's tied SAE, as the README's first example
            if {"tied", "k"} & set(kwargs):
                raise TypeError("SAE(d_in, d_sae) is the seed's tied SAE; build the others with "
                                f"saelab.sae_for(architecture, d_in, d_sae, ...), architecture one of "
                                f"{architecture_names()} (tied=False was 'standard', k=... is 'topk')")
            cls = REGISTRY["tied"]
        return super().__new__(cls)

    def __init__(self, d_in: int, d_sae: int, *, metadata: dict | None = None, apply_b_dec_to_input: bool = False):
        super().__init__()
        if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
            raise ValueError(f"d_in and d_sae must be positive integers, got d_in={d_in!r}, d_sae={d_sae!r}")
        self.d_in, self.d_sae = d_in, d_sae
        self.metadata = dict(metadata or {})  # model_name, hook_name, profile: written to cfg.json
        self.apply_b_dec_to_input = apply_b_dec_to_input  # SAELens' option: encode x - b_dec (saelab trains False)
        # nn.Linear's default init, which the seed's nn.Linear encoder used: U(-1/sqrt(d_in), 1/sqrt(d_in))
        bound = 1 / math.sqrt(d_in)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae).uniform_(-bound, bound))
        self.b_enc = nn.Parameter(torch.empty(d_sae).uniform_(-bound, bound))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def _add_unit_norm_decoder(self) -> None:
        """W_dec [d_sae, d_in] = W_enc^T with rows scaled to unit norm. Contiguous, not a transposed view's
        clone: fused Adam walks parameter and state memory in step, and restored state is contiguous."""
        W_dec = self.W_enc.detach().t().contiguous()
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))

    @property
    def decoder_weight(self) -> torch.Tensor:
        """W_dec [d_sae, d_in]: rows are feature directions in the residual stream."""
        return self.W_dec

    def option_values(self) -> dict:
        return {name: getattr(self, name) for name in self.options}

    # ------------------------------------------------------------------ the model

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae): x @ W_enc + b_enc (SAELens' apply_b_dec_to_input: x - b_dec first)."""
        return (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) non-negative feature activations, as used for analysis."""
        raise NotImplementedError

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in)."""
        return h @ self.decoder_weight + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features but the SAE expects d_in={self.d_in}; "
                             "check that the activations come from the hook the SAE was trained on")
        h = self.encode(x)
        return SAEOutput(x_hat=self.decode(h), h=h)

    # ------------------------------------------------------------------ training: what the loop asks

    def loss(self, x: torch.Tensor, sparsity_coefficient: torch.Tensor, dead: torch.Tensor) -> Losses:
        """The training objective on a batch x (batch, d_in). dead: (d_sae,) bool, latents unfired for a while."""
        raise NotImplementedError

    def backward(self, x: torch.Tensor, sparsity_coefficient: torch.Tensor, dead: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> Losses:
        """Fill every parameter's .grad for one batch; returns the detached loss terms. dtype bfloat16:
        matmuls under autocast (parameters and Adam stay float32). An architecture may override this
        with a faster exact path (the tied SAE does), never the loop."""
        autocast = (torch.autocast(x.device.type, dtype=dtype, cache_enabled=False)
                    if dtype in (torch.bfloat16, torch.float16) else contextlib.nullcontext())
        with autocast:
            losses = self.loss(x, sparsity_coefficient, dead)
        losses.total.backward()
        return losses.detach()

    def constrain_grads(self) -> None:
        """Before the optimizer step (e.g. drop the gradient along each unit-norm decoder row)."""

    def constrain_weights(self) -> None:
        """After the optimizer step (e.g. put decoder rows back on the unit sphere)."""

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str) -> None:
        """method: "zeros" (the seed: nn.Parameter(torch.zeros(d_in))), "mean" or "geometric_median" of sample."""
        if method == "zeros":
            self.b_dec.zero_()
        elif method == "mean":
            self.b_dec.copy_(sample.mean(dim=0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(sample.float()))
        else:
            raise ValueError(f"b_dec_init={method!r}: choose 'zeros' (the seed), 'mean' or 'geometric_median'")

    # ------------------------------------------------------------------ files

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under SAELens' names for `saelens_architecture`."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.decoder_weight, "b_dec": self.b_dec}

    def load_tensors(self, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
        """Copy weights read from a folder into this SAE (inverse of `saelens_tensors`)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(tensors[name])

    def cfg_dict(self) -> dict:
        """SAELens v6 config; saelab's own keys live under "saelab" and SAELens ignores them."""
        return {"architecture": self.saelens_architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
                "normalize_activations": "none", "reshape_activations": "none", "metadata": {**self.metadata},
                "saelab": {"format_version": FORMAT_VERSION, "architecture": self.architecture,
                           "options": self.option_values()}}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write cfg.json and sae_weights.safetensors, each atomically (temp file + rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.saelens_tensors().items()}
        weights_tmp = directory / (WEIGHTS_FILENAME + ".tmp")
        save_file(tensors, weights_tmp)
        os.replace(weights_tmp, directory / WEIGHTS_FILENAME)
        cfg_tmp = directory / (CFG_FILENAME + ".tmp")
        cfg_tmp.write_text(json.dumps(self.cfg_dict(), indent=2))
        os.replace(cfg_tmp, directory / CFG_FILENAME)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
        """Read a folder written by `save`, or by SAELens (standard, topk, jumprelu), as the right
        architecture class, in float32 on `device`. Never unpickles."""
        directory = Path(directory)
        cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: an SAE folder holds {CFG_FILENAME} and "
                                        f"{WEIGHTS_FILENAME} (written by SAE.save or SAELens)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path} is not valid JSON ({err}); re-save the SAE") from err
        architecture, options = _architecture_of(cfg, directory)
        try:
            tensors = load_file(weights_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err}); it may be "
                             "truncated or another format. Re-save or retrain the SAE.") from err
        sae = REGISTRY[architecture](cfg["d_in"], cfg["d_sae"], metadata=cfg.get("metadata"),
                                     apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)), **options)
        expected = {name: tuple(t.shape) for name, t in sae.saelens_tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{weights_path} lacks {missing}; a {sae.saelens_architecture} SAE has {sorted(expected)}")
        wrong = {n: tuple(tensors[n].shape) for n, shape in expected.items() if tuple(tensors[n].shape) != shape}
        if wrong:
            raise ValueError(f"{weights_path}: shapes {wrong} do not match cfg.json (d_in={cfg['d_in']}, "
                             f"d_sae={cfg['d_sae']}); expected {expected}")
        sae.load_tensors({n: t.float() for n, t in tensors.items()}, cfg)
        return sae.to(device)


def _architecture_of(cfg: dict, directory: Path) -> tuple[str, dict]:
    """(registered architecture, its options) for a cfg.json written by saelab (either format) or SAELens."""
    ours = cfg.get("saelab", {})
    if "architecture" in ours:
        return ours["architecture"], ours.get("options", {})
    for key, fine in (("normalize_activations", "none"), ("reshape_activations", "none"),
                      ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(key, fine) != fine:
            raise ValueError(f"{directory}: {key}={cfg[key]!r} is not supported by saelab (it loads SAEs with "
                             f"{key}={fine!r}); fold it into the weights in SAELens first (e.g. fold_W_dec_norm)")
    saelens = cfg.get("architecture", "standard")
    if saelens == "standard":  # format 1 marked the seed's tied SAE with a flag
        return ("tied" if ours.get("tied") else "standard"), {}
    if saelens == "topk":
        return "topk", {"k": int(cfg["k"])}
    if saelens == "jumprelu":
        return "jumprelu", {}
    raise ValueError(f"{directory}: architecture {saelens!r} is not one saelab implements; saelab loads SAELens "
                     f"folders of architecture 'standard', 'topk' or 'jumprelu' (its own: {architecture_names()})")


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to `points` (n, d) -> (d,).

    Bricken et al. 2023 and SAELens initialise b_dec with it: robust to outlier tokens.
    """
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(eps)  # (n,)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


def losses_of(mse: torch.Tensor, sparsity: torch.Tensor, aux: torch.Tensor, total: torch.Tensor,
              h: torch.Tensor) -> Losses:
    """The named terms an architecture's `loss` returns; h is detached, mass = sum over the batch of h."""
    h = h.detach()
    return Losses(total=total, mse=mse, sparsity=sparsity, aux=aux, h=h, mass=h.sum(0))


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
