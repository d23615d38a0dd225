"""The sparse autoencoder.

    h     = ReLU(x @ W_enc + b_enc)          (TopK: keep the k largest pre-activations, then ReLU)
    x_hat = h @ W_dec + b_dec                tied (the seed): W_dec = W_enc^T

The tied form is the seed's `F.linear(h, encoder.weight.t(), b_dec)` with W_enc = encoder.weight^T.
Names and shapes follow SAELens (W_enc [d_in, d_sae], W_dec [d_sae, d_in]) so that `save`
writes a folder `sae_lens.SAE.load_from_disk` reads: `cfg.json` + `sae_weights.safetensors`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (batch, d_in) reconstruction
    h: torch.Tensor  # (batch, d_sae) feature activations, >= 0


class SAE(nn.Module):
    """ReLU (or TopK) sparse autoencoder; `tied=True` reuses W_enc^T as the decoder, as the seed."""

    def __init__(self, d_in: int, d_sae: int, tied: bool = True, k: int | None = None,
                 metadata: dict | None = None):
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        if k is not None and not 0 < k <= d_sae:
            raise ValueError(f"k={k} must be between 1 and d_sae={d_sae} (or None for plain ReLU)")
        self.d_in, self.d_sae, self.tied, self.k = d_in, d_sae, tied, k
        self.metadata = dict(metadata or {})  # model_name, hook_name, profile: written to cfg.json
        # nn.Linear's default init, which the seed's nn.Linear encoder used: U(-1/sqrt(d_in), 1/sqrt(d_in))
        bound = 1 / math.sqrt(d_in)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae).uniform_(-bound, bound))
        self.b_enc = nn.Parameter(torch.empty(d_sae).uniform_(-bound, bound))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if not tied:
            # contiguous, not a transposed view's clone (which keeps the transposed strides): fused
            # Adam walks parameter and state memory in step, and restored state is contiguous
            W_dec = self.W_enc.detach().t().contiguous()  # (d_sae, d_in)
            self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))

    @property
    def decoder_weight(self) -> torch.Tensor:
        """W_dec [d_sae, d_in]: rows are feature directions in the residual stream."""
        return self.W_enc.t() if self.tied else self.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) non-negative feature activations."""
        pre = x @ self.W_enc + self.b_enc
        if self.k is None:
            return torch.relu(pre)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in)."""
        return h @ self.decoder_weight + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features but the SAE expects d_in={self.d_in}; "
                             "check that the activations come from the hook the SAE was trained on")
        h = self.encode(x)
        return SAEOutput(x_hat=self.decode(h), h=h)

    # ------------------------------------------------------------------ files

    def cfg_dict(self) -> dict:
        """SAELens v6 config; saelab's own keys live under "saelab" and SAELens ignores them."""
        return {
            "architecture": "standard" if self.k is None else "topk",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            **({"k": self.k} if self.k is not None else {}),
            "dtype": "float32",
            "device": "cpu",
            # the seed encodes x itself, not x - b_dec
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {**self.metadata},
            "saelab": {"format_version": 1, "tied": self.tied},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write cfg.json and sae_weights.safetensors, each atomically (temp file + rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.decoder_weight, "b_dec": self.b_dec}
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
        weights_tmp = directory / (WEIGHTS_FILENAME + ".tmp")
        save_file(tensors, weights_tmp)
        os.replace(weights_tmp, directory / WEIGHTS_FILENAME)
        cfg_tmp = directory / (CFG_FILENAME + ".tmp")
        cfg_tmp.write_text(json.dumps(self.cfg_dict(), indent=2))
        os.replace(cfg_tmp, directory / CFG_FILENAME)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
        """Read a folder written by `save` (or by SAELens for a standard/topk SAE). Never unpickles."""
        directory = Path(directory)
        cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: an SAE folder holds {CFG_FILENAME} and "
                                        f"{WEIGHTS_FILENAME} (written by SAE.save)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path} is not valid JSON ({err}); re-save the SAE") from err
        architecture = cfg.get("architecture", "standard")
        if architecture not in ("standard", "topk"):
            raise ValueError(f"{directory}: architecture {architecture!r} is not supported; "
                             "saelab loads 'standard' and 'topk' SAEs")
        try:
            tensors = load_file(weights_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err}); it may be "
                             "truncated or another format. Re-save or retrain the SAE.") from err
        d_in, d_sae = cfg["d_in"], cfg["d_sae"]
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{weights_path} lacks {missing}; expected keys {sorted(expected)}")
        wrong = {n: tuple(tensors[n].shape) for n, shape in expected.items() if tuple(tensors[n].shape) != shape}
        if wrong:
            raise ValueError(f"{weights_path}: shapes {wrong} do not match cfg.json (d_in={d_in}, d_sae={d_sae}); "
                             f"expected {expected}")
        tied = cfg.get("saelab", {}).get("tied", False)
        if tied and not torch.equal(tensors["W_dec"], tensors["W_enc"].t()):
            raise ValueError(f"{directory}: cfg.json says tied, but W_dec != W_enc^T in the weights file")
        sae = cls(d_in, d_sae, tied=tied, k=cfg.get("k"), metadata=cfg.get("metadata"))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "b_dec") + (() if tied else ("W_dec",)):
                getattr(sae, name).copy_(tensors[name])
        return sae.to(device)
