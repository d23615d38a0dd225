"""Where an artifact came from: a store's identity, and an SAE's record of the store it was trained on.

A store's manifest already says what its activations depend on (saelab.store: model, hook, dtype,
LM, tokens and capture settings, tokenizer, versions). An SAE trained by saelab carries, in cfg.json's
`metadata.saelab_provenance` (SAELens ignores keys it does not know):

    store      id (a digest of the manifest: settings and every shard's checksum), folder, split,
               rows, and its lineage: every setting the activations depend on, split aside
    profile    the profile's name;  training: the training settings;  versions: saelab, torch, ...

`check` compares that lineage with a store about to be analysed (notebooks 04 and 06) and refuses a
stale pair, naming each difference; `allow_stale=True` proceeds anyway, with a warning. The held-out
"mae" split shares the "train" split's lineage, so an SAE trained on one reads the other. A folder
without the record (SAELens, or saelab before it kept one) loads with a note: only d_in and the hook
can be checked then.
"""

from __future__ import annotations

import hashlib
import json
import warnings

from saelab.store import CHECKSUM, ActivationStore, versions

KEY = "saelab_provenance"  # the key under cfg.json's metadata
PER_SPLIT = ("split", "profile")  # manifest metadata that differs between stores of one lineage


class StaleSAE(ValueError):
    """The SAE was trained on activations of another LM, hook, tokenizer or capture setting."""


def store_id(manifest: dict) -> str:
    """16 hex digits identifying a store: its settings and every shard's rows and checksum."""
    identity = {k: manifest.get(k) for k in ("model_name", "hook", "d_in", "dtype", "metadata")}
    identity["shards"] = [(s["file"], s["rows"], s.get(CHECKSUM)) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def lineage(manifest: dict) -> dict:
    """Every setting a store's activations depend on, those that differ between its splits aside:
    model, hook, d_in, dtype, the LM (settings, config, trained-LM settings), tokens, capture, tokenizer."""
    metadata = {k: v for k, v in manifest.get("metadata", {}).items() if k not in PER_SPLIT}
    tokenizer = manifest.get("provenance", {}).get("tokenizer")
    return {**{k: manifest.get(k) for k in ("model_name", "hook", "d_in", "dtype")}, **metadata,
            **({"tokenizer": tokenizer} if tokenizer is not None else {})}


def sae_record(store: ActivationStore | None, *, profile: str, training: dict) -> dict:
    """The provenance an SAE trained on `store` (None: activations given directly) keeps in its cfg.json."""
    trained_on = None if store is None else {
        "id": store_id(store.manifest), "directory": str(store.directory), "split": store.metadata.get("split"),
        "n_rows": store.n_rows, "lineage": lineage(store.manifest)}
    return {"store": trained_on, "profile": profile, "training": training, "versions": versions()}


def record_provenance(sae, store: ActivationStore | None, *, profile: str, training: dict) -> None:
    """Put `sae_record(...)` into sae.metadata, which SAE.save writes to cfg.json."""
    sae.metadata[KEY] = sae_record(store, profile=profile, training=training)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def differences(record: dict, store: ActivationStore) -> list[str]:
    """'setting: trained on X, this store Y' for each setting where the SAE's store and `store` differ. A
    setting one side did not record (a store captured before saelab recorded its tokenizer) is not compared."""
    trained, here = _flat(record["store"]["lineage"]), _flat(lineage(store.manifest))
    return [f"{k}: trained on {trained[k]!r}, this store {here[k]!r}"
            for k in sorted(set(trained) & set(here)) if trained[k] != here[k]]


def note_if_unrecorded(sae, where: str = "the SAE") -> bool:
    """A note (a warning) when an SAE loaded from a folder carries no record of its store (a SAELens folder,
    saelab before it kept one, or activations given directly): it loads, but staleness cannot be checked.
    Returns True when it has a record."""
    record = (sae.metadata or {}).get(KEY)
    if record and record.get("store"):
        return True
    why = ("was trained on activations given directly, not a store" if record
           else "carries no saelab provenance (a SAELens folder, or saved before saelab recorded it)")
    warnings.warn(f"note: {where} {why}; it loads, but only its width and hook can be checked against a store",
                  stacklevel=3)
    return False


def check(sae, store: ActivationStore, where: str = "the SAE", *, allow_stale: bool = False) -> list[str]:
    """Refuse (StaleSAE) an SAE whose recorded store differs from `store` in any setting, naming each;
    with allow_stale=True warn instead. An SAE without a record passes (`note_if_unrecorded` says so
    where folders are loaded). Each SAE object is checked once per store: once a stale pair is allowed,
    later passes with it (e.g. max_activating after load_sae) proceed. Returns the differences ([] when
    none, unrecorded or already checked)."""
    done = sae.__dict__.setdefault("_provenance_checked", set())  # store ids checked or accepted already
    record = (sae.metadata or {}).get(KEY)
    if store_id(store.manifest) in done or not record or not record.get("store"):
        return []
    found = differences(record, store)
    if not found:
        done.add(store_id(store.manifest))
        return []
    trained = record["store"]
    message = (f"{where} was trained on the store {trained['directory']} (id {trained['id']}), whose settings differ "
               f"from the store {store.directory} (id {store_id(store.manifest)}): {'; '.join(found)}. Retrain it "
               "on this store (notebook 03), or use the store it was trained on; to proceed anyway, pass "
               "allow_stale=True")
    if not allow_stale:
        raise StaleSAE(message)
    warnings.warn(f"{message} (allow_stale=True: proceeding)", stacklevel=3)
    done.add(store_id(store.manifest))  # later passes over this store with this SAE object proceed too
    return found
