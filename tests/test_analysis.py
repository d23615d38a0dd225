"""Streaming MAE against brute force on small stores written here."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab.features.analysis import (
    RunningTopK,
    logit_attribution,
    max_activating,
    top_features,
    top_logit_tokens,
    unembedding,
)
from saelab.sae import SAE, sae_for
from saelab.store import StoreWriter

ROOT = Path(__file__).resolve().parent.parent

PAD = 99


def write_store(path, x, shard_sizes, token_ids=None):
    """A store of x (rows, d_in) split into shards; contexts of 4 rows, positions 1..4."""
    rows = x.shape[0]
    token_ids = torch.arange(rows) % 50 if token_ids is None else token_ids
    index = {"context": torch.arange(rows) // 4, "position": torch.arange(rows) % 4 + 1, "token_id": token_ids}
    writer = StoreWriter(path, model_name="test", hook="blocks.0.hook_resid_pre", d_in=x.shape[1], dtype="float32")
    start = 0
    for size in shard_sizes:
        writer.add_shard(x[start:start + size], {k: v[start:start + size] for k, v in index.items()}, contexts=1)
        start += size
    assert start == rows
    return writer.finish()


def identity_sae(d):
    """h = relu(x): activations equal the stored values, so ties are easy to build."""
    sae = SAE(d, d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.b_enc.zero_()
    return sae


def brute_force(h, k):
    """Per feature: rows sorted by (activation desc, row asc), keeping activations > 0."""
    values, rows = torch.zeros(h.shape[1], k), torch.full((h.shape[1], k), -1)
    for f in range(h.shape[1]):
        order = sorted(range(h.shape[0]), key=lambda r: (-h[r, f].item(), r))
        picked = [r for r in order if h[r, f] > 0][:k]
        values[f, :len(picked)], rows[f, :len(picked)] = h[picked, f], torch.tensor(picked, dtype=torch.long)
    return values, rows


@pytest.mark.parametrize("chunk_rows", [3, 7, 1000])
def test_streaming_top_k_equals_brute_force_with_ties(tmp_path, chunk_rows):
    x = torch.randint(-1, 3, (40, 5)).float()  # values in {-1, 0, 1, 2}: many ties and zeros
    store = write_store(tmp_path / "s", x, [13, 8, 19])
    mae = max_activating(identity_sae(5), store, k=4, chunk_rows=chunk_rows, progress=False)
    values, rows = brute_force(torch.relu(x), 4)
    assert torch.equal(mae.rows, rows)  # smaller row wins every tie, whatever the chunking
    assert torch.equal(mae.values, values)


def test_streaming_top_k_random_sae_and_fewer_examples_than_k(tmp_path):
    x = torch.randn(30, 6)
    sae = SAE(6, 16)
    store = write_store(tmp_path / "s", x, [10, 10, 10])
    mae = max_activating(sae, store, k=8, chunk_rows=4, progress=False)
    h = sae.encode(x).detach()
    values, rows = brute_force(h, 8)
    assert torch.equal(mae.rows, rows) and torch.allclose(mae.values, values)
    assert ((mae.rows >= -1) & (mae.rows < store.n_rows)).all()  # never a row outside the store


def test_feature_stats_equal_brute_force(tmp_path):
    x = torch.randn(25, 4)
    sae = SAE(4, 8)
    mae = max_activating(sae, write_store(tmp_path / "s", x, [9, 16]), k=2, chunk_rows=5, progress=False)
    h = sae.encode(x).detach().double()
    stats = mae.stats
    assert mae.n_tokens == 25
    assert torch.allclose(torch.tensor(stats["total_activation"].values), h.sum(0))
    assert stats["n_active"].tolist() == (h > 0).sum(0).tolist()
    assert torch.allclose(torch.tensor(stats["frequency"].values), (h > 0).double().mean(0))
    assert torch.allclose(torch.tensor(stats["max_activation"].values), h.max(0).values)
    for f in range(8):
        active = h[:, f][h[:, f] > 0]
        expected = active.mean().item() if len(active) else math.nan
        assert stats["mean_when_active"][f] == pytest.approx(expected, nan_ok=True)


def test_excluded_pad_rows_are_never_examples_nor_counted(tmp_path):
    x = torch.rand(20, 3) + 0.1
    x[::3] += 10.0  # the pad rows would dominate every feature's top-k
    token_ids = torch.arange(20) % 7
    token_ids[::3] = PAD
    store = write_store(tmp_path / "s", x, [20], token_ids)
    mae = max_activating(identity_sae(3), store, k=3, exclude_token_ids={PAD}, progress=False)
    picked = mae.rows[mae.rows >= 0]
    assert len(picked) == 9 and not (mae.index["token_id"][picked] == PAD).any()
    keep = token_ids != PAD
    assert mae.n_tokens == int(keep.sum())
    assert torch.allclose(torch.tensor(mae.stats["total_activation"].values), x[keep].double().sum(0))


def test_bad_input_gets_a_clear_error(tmp_path):
    store = write_store(tmp_path / "s", torch.randn(8, 3), [8])
    with pytest.raises(ValueError, match="d_in=3"):
        max_activating(SAE(4, 8), store, progress=False)
    with pytest.raises(ValueError, match="trained on 'blocks.7.hook_resid_pre'"):
        max_activating(SAE(3, 8, metadata={"hook_name": "blocks.7.hook_resid_pre"}), store, progress=False)
    x = torch.randn(8, 3)
    x[5, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        max_activating(SAE(3, 8), write_store(tmp_path / "nan", x, [8]), progress=False)
    for k in (0, -1, 2.5):  # k=0 used to raise a bare IndexError deep inside topk
        with pytest.raises(ValueError, match=f"k={k}: the number of examples"):
            max_activating(SAE(3, 8), store, k=k, progress=False)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        max_activating(SAE(3, 8), store, chunk_rows=0, progress=False)


def test_top_features_orders_by_column_then_feature_id(tmp_path):
    x = torch.tensor([[1.0, 2.0, 2.0, 0.5]])
    mae = max_activating(identity_sae(4), write_store(tmp_path / "s", x, [1]), k=1, progress=False)
    assert top_features(mae.stats, n=3).index.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="unknown column"):
        top_features(mae.stats, by="nope")


def test_logit_attribution_by_hand():
    sae = sae_for("standard", 2, 1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 3.0]]))
    W_U = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # (d_in, d_vocab)
    # centred direction [-1, 1]: logits [-1, 1, -3], minus their mean -1: [0, 2, -2]; uncentred [1, 3]: [1, 3, -1]
    assert torch.equal(logit_attribution(sae, W_U, 0), torch.tensor([0.0, 2.0, -2.0]))
    assert torch.equal(logit_attribution(sae, W_U, 0, center=False), torch.tensor([1.0, 3.0, -1.0]))
    lm = SimpleNamespace(W_U=W_U, ln_final=SimpleNamespace(w=torch.tensor([2.0, 0.5])))
    assert torch.equal(unembedding(lm), torch.tensor([[2.0, 0.0, 4.0], [0.0, 0.5, -0.5]]))
    folded = SimpleNamespace(W_U=W_U, ln_final=SimpleNamespace())  # TransformerLens LNPre: no w
    assert torch.equal(unembedding(folded), W_U)
    tokenizer = SimpleNamespace(decode=lambda ids: "abc"[ids[0]])
    table = top_logit_tokens(torch.tensor([-1.0, 1.0, -3.0]), tokenizer, n=1)
    assert table[["token", "logit", "effect"]].values.tolist() == [["b", 1.0, "promoted"], ["c", -3.0, "suppressed"]]


def test_logit_attribution_is_the_same_with_ln_final_folded_or_not():
    """TransformerLens folds ln_final.w into W_U (fold_ln=True, as saelab.data.lm loads GPT-2) and centres
    W_U over d_model; unfolded, unembedding() multiplies the scale in. With the direction centred as
    LayerNorm centres it, both give the same attribution."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.config import LM_SETTINGS
    from saelab.data.lm import hooked_from_hf

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        hf.transformer.ln_f.weight.copy_(torch.rand(16) + 0.5)  # a scale that is not all ones
    folded = hooked_from_hf(hf)
    unfolded = hooked_from_hf(hf, settings={**LM_SETTINGS, "fold_ln": False})
    assert not hasattr(folded.ln_final, "w") and hasattr(unfolded.ln_final, "w")
    sae = SAE(16, 4)
    for f in range(4):
        expected = logit_attribution(sae, unembedding(unfolded), f)
        assert torch.allclose(logit_attribution(sae, unembedding(folded), f), expected, atol=1e-6)
        assert not torch.allclose(logit_attribution(sae, unfolded.W_U, f), expected, atol=1e-4)  # scale matters


def saelens_folder(path, d_in, d_sae, hook="blocks.6.hook_resid_pre", model="offline-tiny", apply_b_dec=False,
                   **metadata):
    """An SAE folder written by SAELens itself (its own save_model), biases non-zero so they count."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec,
                            metadata=SAEMetadata(hook_name=hook, model_name=model, **metadata))
    reference = StandardSAE(cfg)
    with torch.no_grad():
        reference.b_enc.copy_(torch.randn(d_sae) * 0.1)
        reference.b_dec.copy_(torch.randn(d_in))
    reference.save_model(path)
    return reference


def test_load_sae_reads_a_folder_saelens_wrote_and_encodes_as_saelens(tmp_path):
    from saelab.config import OFFLINE
    from saelab.features.analysis import load_sae

    reference = saelens_folder(tmp_path / "jb", OFFLINE.d_in, 96, hook=OFFLINE.hook)
    sae = load_sae(OFFLINE.replace(sae_path=str(tmp_path / "jb")))
    x = torch.randn(7, OFFLINE.d_in)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), reference.encode(x), atol=1e-5)
        assert torch.allclose(sae(x).x_hat, reference(x), atol=1e-5)
    assert sae.d_sae == 96 and sae.metadata["hook_name"] == OFFLINE.hook


def test_load_sae_defaults_to_notebook_03s_sae(tmp_path):
    from saelab import paths
    from saelab.config import OFFLINE
    from saelab.features.analysis import load_sae

    SAE(OFFLINE.d_in, 32, metadata={"hook_name": OFFLINE.hook}).save(paths.sae_dir(OFFLINE))
    assert load_sae(OFFLINE).d_sae == 32


def test_load_sae_refuses_what_it_cannot_analyse_faithfully(tmp_path):
    from saelab.config import OFFLINE
    from saelab.features.analysis import load_sae

    with pytest.raises(FileNotFoundError, match="sae_path='nowhere' is not a folder"):
        load_sae(OFFLINE.replace(sae_path="nowhere"))
    saelens_folder(tmp_path / "wide", 768, 16, hook=OFFLINE.hook)
    with pytest.raises(ValueError, match="d_in=768.*d_in=64"):
        load_sae(OFFLINE.replace(sae_path=str(tmp_path / "wide")))
    saelens_folder(tmp_path / "l7", OFFLINE.d_in, 16, hook="blocks.7.hook_resid_pre")
    with pytest.raises(ValueError, match="'blocks.7.hook_resid_pre'.*hook='blocks.7.hook_resid_pre'"):
        load_sae(OFFLINE.replace(sae_path=str(tmp_path / "l7")))
    saelens_folder(tmp_path / "gpt2", OFFLINE.d_in, 16, hook=OFFLINE.hook, model="gpt2-small")
    with pytest.warns(UserWarning, match="'gpt2-small'"):
        load_sae(OFFLINE.replace(sae_path=str(tmp_path / "gpt2")))
    with pytest.warns(UserWarning, match="from_pretrained_kwargs"):  # SAELens' own note on such SAEs
        saelens_folder(tmp_path / "centred", OFFLINE.d_in, 16, hook=OFFLINE.hook,
                       model_from_pretrained_kwargs={"center_writing_weights": True})
    with pytest.warns(UserWarning, match="center_writing_weights"):
        load_sae(OFFLINE.replace(sae_path=str(tmp_path / "centred")))
    # SAELens' default, x - b_dec before encoding, is applied
    saelens_folder(tmp_path / "bdec", OFFLINE.d_in, 16, hook=OFFLINE.hook, apply_b_dec=True)
    assert load_sae(OFFLINE.replace(sae_path=str(tmp_path / "bdec"))).apply_b_dec_to_input is True


def test_notebook_04_analyses_a_folder_saelens_wrote(tiny, tmp_path, monkeypatch):
    """The issue's 'done when': notebook 04 runs on an SAE folder made by SAELens on the offline shape."""
    import nbformat
    from nbclient import NotebookClient

    from saelab import paths
    from saelab.data.capture import capture_activations

    capture_activations(tiny, "mae", "cpu", progress=False)
    saelens_folder(tmp_path / "saelens_sae", tiny.d_in, 96, hook=tiny.hook, model=tiny.model_name)
    profile = tiny.replace(sae_path=str(tmp_path / "saelens_sae"), dashboard_features=3)
    (tmp_path / "profile.json").write_text(profile.to_json())
    monkeypatch.setenv("SAELAB_PROFILE", str(tmp_path / "profile.json"))
    notebook = nbformat.read(ROOT / "notebooks" / "04_mae_analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    figures = paths.figures_dir(profile)
    assert (figures / "dashboards" / "index.html").is_file() and (figures / "04_feature_card.svg").is_file()
    assert "SAE saelens_sae" in (figures / "04_feature_density.html").read_text()  # titles name the SAE analysed
    assert not paths.sae_dir(profile).exists()  # no notebook-03 SAE was needed


def dyadic_sae(d_in: int, d_sae: int, seed: int = 0) -> SAE:
    """Weights in multiples of 1/4 in [-1, 1]: with integer activations every product and sum is exact in
    float32 and TF32 alike, so encodings (and their ties) are bit-identical on every device."""
    generator = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-4, 5, (d_in, d_sae), generator=generator) / 4)
        sae.b_enc.copy_(torch.randint(-4, 5, (d_sae,), generator=generator) / 4)
    return sae


def test_max_activating_on_device_equals_cpu_and_leaves_the_sae_where_it_was(tmp_path, device):
    x = torch.randint(-3, 4, (60, 6)).float()  # many exact ties: tie-breaking must agree too
    store = write_store(tmp_path / "s", x, [25, 35])
    sae = dyadic_sae(6, 16)
    expected = max_activating(sae, store, k=4, chunk_rows=7, progress=False)
    on_device = max_activating(sae, store, k=4, chunk_rows=7, device=device, progress=False)
    assert {p.device.type for p in sae.parameters()} == {"cpu"}  # a copy was sent, not the caller's SAE
    sae_there = copy.deepcopy(sae).to(device)
    in_place = max_activating(sae_there, store, k=4, chunk_rows=7, progress=False)  # no device: where the SAE lives
    for mae in (on_device, in_place):
        assert mae.rows.device.type == mae.values.device.type == "cpu"
        assert torch.equal(mae.rows, expected.rows) and torch.equal(mae.values, expected.values)
        assert mae.stats.equals(expected.stats)
    assert (expected.rows[:, 1:] >= 0).any()  # features with several examples: the comparison is not vacuous


def test_running_top_k_keeps_the_largest_keys_and_their_payloads_whatever_the_chunking():
    torch.manual_seed(0)
    keys = torch.randperm(60).reshape(20, 3)  # unique keys, 20 rows x 3 columns
    payload = keys.float()[..., None] * torch.tensor([1.0, -1.0])  # (rows, columns, 2): travels with each key
    for chunk in (1, 7, 20):
        running = RunningTopK(4, 3, torch.device("cpu"), pair=((2,), float("nan")))
        for start in range(0, 20, chunk):
            block = slice(start, start + chunk)
            running.update(keys[block], lambda best, b=block: {"pair": payload[b].gather(
                0, best[..., None].expand(-1, -1, 2))})
        expected = keys.topk(4, dim=0).values
        assert torch.equal(running.keys, expected)
        assert torch.equal(running.payloads["pair"][..., 0], expected.float())  # each payload beside its key
        assert torch.equal(running.payloads["pair"][..., 1], -expected.float())


def test_token_text_shows_partial_utf8_bytes_instead_of_replacement_characters():
    from saelab.features.analysis import token_text

    euro = "€".encode()  # b'\xe2\x82\xac': a byte-level BPE may split it into tokens of one or two bytes
    assert euro[:2] == b"\xe2\x82"  # in GPT-2's byte alphabet 0xe2 is 'â' and 0x82 is 'Ĥ'
    tokenizer = SimpleNamespace(decode=lambda ids: {0: " €", 1: "\ufffd"}[ids[0]],
                                convert_ids_to_tokens=lambda ids: [{0: "Ġâ\x82¬", 1: "âĤ"}[ids[0]]])
    assert token_text(tokenizer, 0) == " €"  # a whole character: decoded as it is
    assert token_text(tokenizer, 1) == "<0xE2><0x82>"  # GPT-2's alphabet: 'â' is byte 0xe2, 'Ĥ' byte 0x82
    assert token_text(SimpleNamespace(decode=lambda ids: "\ufffd"), 1) == "\ufffd"  # no vocabulary to read


def test_specific_features_rank_sparse_single_token_features_first():
    from saelab.features.analysis import MAEResult, feature_stats, specific_features

    # 5 features over 1000 tokens, 4 examples each; token ids of the examples' rows are the row numbers // 10
    frequency = torch.tensor([0.5, 0.01, 0.02, 0.01, 0.0005])  # 0 is dense, 4 too rare
    counts = (frequency * 1000).long()
    rows = torch.tensor([[0, 1, 2, 3],      # dense: same token, but out of the band
                         [10, 11, 20, 30],  # purity 2/4
                         [40, 41, 42, 43],  # purity 4/4
                         [50, 51, 52, 60],  # purity 3/4
                         [70, 71, 72, 73]])  # purity 4/4, too rare
    max_values = torch.tensor([9.0, 1.0, 2.0, 3.0, 5.0])
    stats = feature_stats(max_values * counts, counts, max_values, 1000)
    index = {"token_id": torch.arange(1000) // 10, "position": torch.arange(1000) % 7, "context": torch.arange(1000)}
    mae = MAEResult(max_values[:, None].expand(-1, 4), rows, stats, index, 1000)
    ranked = specific_features(mae, n=10)
    assert ranked.index.tolist() == [2, 3, 1]
    assert ranked["token_purity"].tolist() == [1.0, 0.75, 0.5]
    assert specific_features(mae, n=1).index.tolist() == [2]
    mae.rows[3] = torch.tensor([40, 41, 42, 50])  # feature 3's most common token is now feature 2's
    assert specific_features(mae, n=10).index.tolist() == [2, 1]  # one feature per token
    assert specific_features(mae, n=10, one_per_token=False).index.tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match="band"):
        specific_features(mae, band=(0.5, 0.1))


def test_load_sae_before_notebook_03_says_to_run_it(tmp_path):
    from saelab.config import OFFLINE
    from saelab.features.analysis import load_sae

    with pytest.raises(FileNotFoundError, match="run notebook 03_train first"):
        load_sae(OFFLINE)
