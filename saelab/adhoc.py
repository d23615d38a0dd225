"""The common ad-hoc question in one line: what are this feature's top examples?

    saelab.top_examples(55, "runs/offline")               # a run folder (notebook 03's SAE, its held-out store)
    saelab.top_examples(55, "runs/offline/sae/topk")      # any SAE folder (cfg.json + sae_weights.safetensors)
    saelab.top_examples(55, "offline")                    # a profile name (or a Profile)
    card = saelab.feature_card(55, saelab.explore("runs/offline", logits=True))  # the whole card

An `Examples` table: the examples with their context text in a terminal, highlighted in a notebook.
This module sits above the stages (it needs the tokens of notebook 01, the store of 02, the SAE of 03
and the analysis of 04), as the studies do.
"""

from __future__ import annotations

from pathlib import Path

from saelab import paths
from saelab.config import PROFILES, Profile, load_profile
from saelab.data.capture import open_store
from saelab.data.lm import load_lm
from saelab.data.tokens import load_tokenizer, load_tokens
from saelab.features.analysis import load_sae, max_activating, unembedding
from saelab.features.cards import Examples, FeatureExplorer
from saelab.sae import CFG_FILENAME, SAE
from saelab.store import ActivationStore

SPLIT = "mae"  # the held-out store notebook 04 reads


def _profile_of_run(folder: Path) -> Profile:
    """The profile a run folder runs/<name> was made with: its profile.json (`make workbook`), else <name>."""
    saved = folder / "profile.json"
    profile = load_profile(str(saved)) if saved.is_file() else load_profile(folder.name)
    if paths.run_dir(profile).resolve() != folder.resolve():
        raise ValueError(f"{folder} is a run folder of profile {profile.name!r}, but saelab's runs are under "
                         f"{paths.run_dir(profile).parent}; set SAELAB_ROOT={folder.resolve().parent.parent} "
                         "(the folder that holds runs/) and try again")
    return profile


def _resolve(sae, profile: Profile | str | None) -> tuple[SAE, Profile]:
    """(the SAE, the profile whose tokens and store go with it) from an SAE, a folder or a profile."""
    if isinstance(sae, SAE):
        return sae, load_profile(profile) if not isinstance(profile, Profile) else profile
    if isinstance(sae, Profile) or sae is None or (isinstance(sae, str) and sae in PROFILES):
        chosen = load_profile(sae) if not isinstance(sae, Profile) else sae
        return load_sae(chosen), chosen
    folder = Path(sae).expanduser()
    if (folder / CFG_FILENAME).is_file():  # an SAE folder: the profile says which tokens and store go with it
        chosen = profile if isinstance(profile, Profile) else load_profile(profile)
        chosen = chosen.replace(sae_path=str(folder))
        return load_sae(chosen), chosen
    if (folder / "sae" / "sae" / CFG_FILENAME).is_file():  # a run folder runs/<profile>
        chosen = _profile_of_run(folder)
        return load_sae(chosen), chosen
    raise FileNotFoundError(f"{sae!r} is neither an SAE folder ({CFG_FILENAME} + weights), a run folder holding "
                            f"sae/sae/{CFG_FILENAME} (runs/<profile>, after notebook 03) nor a profile name "
                            f"({', '.join(PROFILES)}); run notebook 03 (03_train) first, or give one of those")


def explore(sae=None, store: ActivationStore | str | Path | None = None, *, profile: Profile | str | None = None,
            k: int = 10, device: str | None = None, logits: bool = False, progress: bool = False) -> FeatureExplorer:
    """A `FeatureExplorer` (for `feature_card`, `.table`, the dashboards) from one SAE and one store.

    sae: an `SAE`, an SAE folder, a run folder runs/<profile>, a profile name or `Profile`; None = the
        current profile (SAELAB_PROFILE or auto-detection). With an SAE or an SAE folder, `profile` (default:
        the current one) says which tokens and store go with it.
    store: an `ActivationStore` or its folder; None = the profile's held-out ("mae") store of notebook 02.
    k: top examples kept per feature (one streaming pass over the store, `analysis.max_activating`).
    logits: also load the profile's language model for the cards' logit tables (offline: notebook 02's model,
        trained first if it is missing, ~90 s; gpt2: from the hub or its cache).
    """
    sae, chosen = _resolve(sae, profile)
    if store is None:
        store = open_store(chosen, SPLIT)
    elif not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    split = store.metadata.get("split", SPLIT)
    mae = max_activating(sae, store, k, device=device, progress=progress)
    tokenizer = load_tokenizer(chosen)
    unembed = unembedding(load_lm(chosen, device, tokenizer=tokenizer, progress=progress)) if logits else None
    return FeatureExplorer(mae, sae, store, load_tokens(chosen, split), tokenizer, chosen, unembed=unembed,
                           device=device)


def top_examples(feature: int, sae=None, store: ActivationStore | str | Path | None = None, *,
                 profile: Profile | str | None = None, k: int = 10, device: str | None = None) -> Examples:
    """The `k` strongest examples of `feature` with their context: a table in a terminal (the token in «»),
    highlighted in a notebook; `.frame` holds activation, token, text, row, context, position, token_id.
    sae, store, profile as in `explore`. One pass over the store (every feature is encoded: k examples of
    another feature are then one `explore(...).table(f)` away)."""
    return explore(sae, store, profile=profile, k=k, device=device).table(feature)

