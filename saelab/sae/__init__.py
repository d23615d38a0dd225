"""The SAE: the base class and registry (base), the loss terms (loss), one file per architecture.

    relu.py      tied (the seed's) and standard: ReLU, L = mse + λ E||h||_1
    topk.py      topk and batchtopk: k latents per token (or per token on average), L = mse + α AuxK
    jumprelu.py  jumprelu: a learned threshold per latent, L = mse + λ0 E||h||_0

Importing this package registers the built-in architectures, so `sae_for`, `SAE(...)` and `SAE.load`
find them; a new architecture is one file with one `@register("name")` class.
"""

# isort: off
# Imported in registration order, which is ARCHITECTURES' order: tied, standard, topk, batchtopk, jumprelu.
from saelab.sae import relu, topk, jumprelu  # noqa: F401
# isort: on
from saelab.sae.base import (
                             CFG_FILENAME,
                             REGISTRY,
                             SAE,
                             WEIGHTS_FILENAME,
                             Losses,
                             SAEOutput,
                             UntiedSAE,
                             architecture_names,
                             geometric_median,
                             register,
                             sae_for,
)

ARCHITECTURES = architecture_names()  # the built-in ones: tied, standard, topk, batchtopk, jumprelu

__all__ = ["ARCHITECTURES", "CFG_FILENAME", "REGISTRY", "SAE", "WEIGHTS_FILENAME", "Losses", "SAEOutput",
           "UntiedSAE", "architecture_names", "geometric_median", "register", "sae_for"]
