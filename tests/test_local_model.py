"""The gpt2 profile with no hub: a local GPT-2 folder (transformers' save_pretrained) and a local text file,
through notebooks 01-02's calls (tokens, the LM, capture). Here the folder holds a tiny random GPT-2; on a GPU
machine benchmarks/e2e.py runs the same with a GPT-2-small-shaped one."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from saelab.config import EOT, load_profile
from saelab.data import capture, lm, tokens
from saelab.data.corpus import DataSourceError

WORDS = "the of a sparse feature model layer token residual stream learns reads writes from into".split()


def text_file(path, n_docs: int = 40):
    """One document per line, each 30-60 words drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n_docs):
        n = int(torch.randint(30, 60, (), generator=generator))
        lines.append(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist()))
    path.write_text("\n".join(lines) + "\n")
    return path


def gpt2_folder(path, documents: list[str]):
    """A 2-layer random GPT-2 and a BPE trained on `documents`, saved as save_pretrained writes them."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokens.train_bpe(documents, 300), bos_token=EOT, eos_token=EOT)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=2, n_head=2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval()


@pytest.fixture(name="local")
def local_fixture(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub request would fail loudly
    text = text_file(tmp_path / "texts.txt")
    hf = gpt2_folder(tmp_path / "gpt2-local", text.read_text().splitlines())
    profile = load_profile("gpt2", name="gpt2-local", model_name=str(tmp_path / "gpt2-local"), dataset_id=str(text),
                           hook="blocks.1.hook_resid_pre", d_in=16, n_texts=24, mae_texts=8, context_size=16,
                           capture_batch_size=4, shard_rows=100)
    return profile, hf


def test_a_local_gpt2_folder_and_text_file_run_tokens_lm_and_capture(local):
    profile, hf = local
    built = tokens.build_tokens(profile)
    bos = tokens.load_tokenizer(profile).convert_tokens_to_ids(EOT)
    assert tokens.summary(profile).loc["train", "documents"] == 24
    assert all(row[0] == bos for row in built["train"]["input_ids"])
    model = lm.load_lm(profile, "cpu", progress=False)
    assert model.cfg.d_model == 16 and lm.weights_origin(profile).startswith("local folder")
    store = capture.capture_activations(profile, "train", "cpu", lm=model, progress=False)
    ids = torch.tensor(built["train"]["input_ids"])  # (contexts, pos)
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True).hidden_states[1][:, 1:].reshape(-1, 16)  # position 0 dropped
    torch.testing.assert_close(store.activations(), expected.half().float(), rtol=1e-3, atol=1e-3)  # float16 store


def test_a_folder_without_a_model_or_tokenizer_says_what_to_save(local, tmp_path):
    profile, _ = local
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        lm.load_lm(profile.replace(model_name=str(empty)), "cpu")
    (tmp_path / "gpt2-local" / "tokenizer.json").unlink()
    with pytest.raises(DataSourceError, match="holds no tokenizer"):
        tokens.load_tokenizer(profile)


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="GPT-2-architecture"):
        lm.load_local_gpt2(tmp_path)
