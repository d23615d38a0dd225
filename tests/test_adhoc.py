"""One line for a feature's top examples: by run folder, SAE folder or profile, the same table."""

import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

import saelab
from saelab import paths
from saelab.data.capture import capture_activations
from saelab.sae import SAE


def test_top_examples_in_one_line_whatever_names_the_sae(tiny):
    capture_activations(tiny, "mae", "cpu", progress=False)
    torch.manual_seed(0)
    SAE(tiny.d_in, 32).save(paths.sae_dir(tiny))  # notebook 03's place
    (paths.run_dir(tiny) / "profile.json").write_text(tiny.to_json())  # as `make workbook` leaves it
    store = saelab.open_store(tiny, "mae")
    feature = int(saelab.max_activating(SAE.load(paths.sae_dir(tiny)), store, 1, progress=False).stats
                  ["n_active"].idxmax())

    by_run = saelab.top_examples(feature, paths.run_dir(tiny), k=4)
    by_folder = saelab.top_examples(feature, paths.sae_dir(tiny), profile=tiny, k=4)
    by_profile = saelab.top_examples(feature, tiny, store=store.directory, k=4)
    frame = by_run.frame
    assert len(frame) == 4 and frame["activation"].is_monotonic_decreasing
    for other in (by_folder, by_profile):
        assert other.frame.equals(frame)
    tokens, texts = saelab.load_tokens(tiny, "mae"), frame["text"].tolist()
    tokenizer = saelab.load_tokenizer(tiny)
    for row, text in zip(frame.itertuples(), texts, strict=True):
        assert tokens[row.context]["input_ids"][row.position] == row.token_id  # the row's own token ...
        assert f"«{tokenizer.decode([row.token_id])}»" in text  # ... marked in its context
        assert len(text) > len(row.token) + 2  # with context around it
    assert texts[0] in repr(by_run) and "top examples" in repr(by_run)  # a terminal shows the context
    assert by_run._repr_html_().count("border:2px") == 4  # a notebook highlights it
    with pytest.raises(FileNotFoundError, match="run notebook 03"):
        saelab.top_examples(feature, paths.run_dir(tiny) / "nowhere")
