"""A written-out copy of SAEBench's sparse-probing rule and probe, to test saelab's against.

`sae-bench` (0.6.0 on PyPI) cannot be installed beside saelab's pins: it requires numpy < 2.0 and
datasets < 4.0 (saelab runs numpy 2 and datasets 5), and pulls torchvision, openai and sae-probes.
So these two functions restate, line for line in behaviour, the ones in SAEBench's
`sae_bench/evals/sparse_probing/probe_training.py` (adamkarvonen/SAEBench, read at version 0.6.0):
`get_top_k_mean_diff_mask` + `apply_topk_mask_reduce_dim` and `train_sklearn_probe` (the L2 branch).
"""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression


def top_k_mean_diff(acts: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The k columns of acts (rows, D) kept by get_top_k_mean_diff_mask: largest |mean(pos) - mean(neg)|.
    SAEBench returns a mask and apply_topk_mask_reduce_dim keeps those columns in index order; the
    columns are returned here as a sorted index for the same reason."""
    diff = (acts[labels == 1].mean(dim=0) - acts[labels == 0].mean(dim=0)).abs()
    top = torch.argsort(diff, descending=True)[:k]
    mask = torch.ones(acts.shape[1], dtype=torch.bool)
    mask[top] = False
    return torch.nonzero(~mask).squeeze(1)


def train_sklearn_probe(train_inputs: torch.Tensor, train_labels: torch.Tensor, max_iter: int = 1000,
                        C: float = 1.0) -> LogisticRegression:  # noqa: N803 (SAEBench's argument name)
    """SAEBench's probe: LogisticRegression(penalty="l2", C=C, max_iter=max_iter) on float32 numpy inputs
    (scikit-learn >= 1.8 deprecates `penalty`; its default is the same L2 penalty)."""
    probe = LogisticRegression(C=C, max_iter=max_iter)
    return probe.fit(train_inputs.to(torch.float32).numpy(), np.asarray(train_labels))
