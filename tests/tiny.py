"""A tiny offline profile and its token files, built once per test session and copied per test."""

import shutil

import pytest

from saelab import paths
from saelab.config import OFFLINE

# 16-token contexts, 15 activation rows each; a shard holds 7 whole contexts (105 >= 100 rows), so
# capture batches of 4 contexts straddle shard boundaries.
# The random-weight model: most tests need a model, not a trained one (tests/test_offline_lm.py trains one).
# Training as short as the tests need (offline itself trains 30 epochs, to convergence).
TINY = OFFLINE.replace(name="tiny", n_texts=24, mae_texts=8, context_size=16, capture_batch_size=4,
                       shard_rows=100, offline_vocab_size=512, offline_lm="random", epochs=5)


@pytest.fixture(scope="session", name="tiny_tokens_root")
def tiny_tokens_root_fixture(tmp_path_factory):
    """A saelab root holding TINY's token files (offline corpus + BPE), built once."""
    root = tmp_path_factory.mktemp("tiny_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELAB_ROOT", str(root))
        from saelab.data.tokens import build_tokens

        build_tokens(TINY)
    return root


@pytest.fixture(name="tiny")
def tiny_fixture(tiny_tokens_root, tmp_path):
    """TINY, with its token files copied into this test's own saelab root (set by conftest)."""
    shutil.copytree(tiny_tokens_root / "runs" / TINY.name / "tokens", paths.tokens_dir(TINY))
    return TINY
