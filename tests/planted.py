"""Small activation stores and profiles for notebook 06's tests (test_baselines, test_interpret)."""

import torch

from saelab.config import GPT2
from saelab.store import StoreWriter

HOOK = "blocks.0.hook_resid_pre"
# GPT-2's settings with tiny notebook 06 sizes: 3 examples per direction, 7-row chunks (never a divisor)
PROFILE = GPT2.replace(name="planted", d_in=4, expansion_factor=2, interp_ica_fit_rows=300, interp_top_examples=3,
                       interp_top_directions=5, interp_chunk_rows=7, interp_bootstrap=200)


def write_store(path, x: torch.Tensor, token_ids: torch.Tensor | None = None, shard_rows: int = 25):
    """A float32 store of x (rows, d_in): contexts of 5 rows at positions 1..5, shards of shard_rows."""
    rows = x.shape[0]
    index = {"context": torch.arange(rows) // 5, "position": torch.arange(rows) % 5 + 1,
             "token_id": torch.arange(rows) % 11 if token_ids is None else token_ids}
    writer = StoreWriter(path, model_name="test", hook=HOOK, d_in=x.shape[1], dtype="float32")
    for start in range(0, rows, shard_rows):
        writer.add_shard(x[start:start + shard_rows], {k: v[start:start + shard_rows] for k, v in index.items()},
                         contexts=1)
    return writer.finish()
