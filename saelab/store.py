"""The activation store: the seam between capture (notebook 02) and training (notebook 03).

A folder of safetensors shards plus `manifest.json`:

    shard_00000.safetensors   activations (rows, d_in) and, per row, the context index,
                              position and token id, so analysis can show each row in context
    manifest.json             model, hook, d_in, dtype, the shard list with row and context
                              counts and each shard's checksum, `complete`, free-form metadata
                              (profile, LM, tokens and capture settings) and `provenance`
                              (tokenizer, package versions: recorded, not compared on resume)

Every shard is written to a temp file and renamed, and the manifest is rewritten (atomically)
after each shard, so a killed capture leaves a valid prefix. `StoreWriter` resumes from it, and
holds the folder's lock (`paths.FolderLock`) while it writes, so two captures never interleave.

Checksums: every read (`iter_shards`, `chunks`, `activations`, `index`) goes through `_read_shard`,
which checks the shard's bytes against the checksum recorded when it was written, so a damaged shard
whose header still parses is an error naming it, never wrong activations. The hash is XXH3-64
(`xxhash`, which `datasets` already installs), taken over the memory-mapped file, whose tensors are
then views of the same map (no copy, no second pass). On this project's 2-core CPU XXH3 hashed ~24 GB/s
from the page cache, zlib's CRC-32 ~4 and blake2b ~0.9, against ~5 GB/s for the cheapest read of a
shard, so XXH3 costs a read a few percent where CRC-32 would cost a doubling; `activations()` and
`chunks()` measured no slower than before, within noise (benchmarks/store_read.py). It is built to
catch damage (a flipped bit changes it with probability 1 - 2^-64), not tampering. `verify()`
checks a whole store.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from saelab.paths import FolderLock, replace_atomically, write_json_atomically, writing

MANIFEST = "manifest.json"
FORMAT = "saelab-activations/1"
INDEX_FIELDS = ("context", "position", "token_id")  # int tensors, one value per activation row
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Chunk(NamedTuple):
    """A run of consecutive store rows, as `ActivationStore.chunks` yields them."""

    first_row: int  # the store row of activations[0]
    activations: torch.Tensor  # (rows, d_in) float32 on the device asked for
    index: dict[str, torch.Tensor]  # INDEX_FIELDS -> (rows,) int64 on the CPU


class ShardDamaged(ValueError):
    """A shard's bytes do not match the checksum the manifest recorded when it was written."""


def _write_json_atomically(path: Path, payload: dict) -> None:  # one name, so tests can interrupt it
    write_json_atomically(path, payload)


CHECKSUM = "xxh3_64"  # the manifest key of a shard's checksum


def checksum(data) -> str:
    """XXH3-64 of a shard file's bytes (or any buffer), 16 hex digits (the module docstring says why)."""
    return xxhash.xxh3_64_hexdigest(data)


def map_file(path: Path) -> mmap.mmap:
    """A file's bytes as a private memory map: read through the page cache, never copied; a tensor built
    on it may be written without touching the file. OSError/ValueError if missing, unreadable or empty."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}


def tensors_in(buffer) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer` (e.g. `map_file`), as views of it, no copy:
    the format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data. Reading the map that was just hashed spares a second pass over the file."""
    n = int.from_bytes(buffer[:8], "little")
    header, out = json.loads(buffer[8:8 + n]), {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = (torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + n + start) if count
                else torch.empty(0, dtype=dtype))
        out[name] = flat.reshape(info["shape"])
    return out


def versions() -> dict:
    """The versions of saelab and of the libraries that write and compute activations."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("saelab", "torch", "safetensors", "transformer-lens"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _shard_rows(path: Path) -> int | None:
    """Row count from the safetensors header, or None if the file is missing or unreadable."""
    try:
        with safe_open(path, "pt") as shard:
            return shard.get_slice("activations").get_shape()[0]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


class StoreWriter:
    """Writes a store into `directory` (created if needed), shard by shard.

    Reopening a folder that holds a partial store with the same model, hook, d_in, dtype and
    metadata resumes after its last whole shard; different settings raise ValueError and leave the
    folder as it is. dtype: the dtype shards are stored in (default "float16").
    """

    def __init__(self, directory: str | os.PathLike, *, model_name: str, hook: str, d_in: int,
                 dtype: str = "float16", metadata: dict | None = None, provenance: dict | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = {"format": FORMAT, "model_name": model_name, "hook": hook, "d_in": d_in,
                         "dtype": dtype, "metadata": metadata or {}, "complete": False,
                         "n_rows": 0, "n_contexts": 0, "shards": [],
                         "provenance": {**(provenance or {}), "versions": versions()}}
        # held until finish() or close(): a second writer is refused, naming this one
        self.lock = FolderLock(self.directory, "writing an activation store").acquire()
        try:
            if (self.directory / MANIFEST).is_file():
                self._resume(json.loads((self.directory / MANIFEST).read_text()))
            for leftover in self.directory.glob("*.tmp"):  # a write that died half-way
                leftover.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock without finishing (the store stays resumable). Idempotent."""
        self.lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resume(self, existing: dict) -> None:
        identity = ("format", "model_name", "hook", "d_in", "dtype", "metadata")
        differs = {k: (existing.get(k), self.manifest[k]) for k in identity if existing.get(k) != self.manifest[k]}
        if differs:
            raise ValueError(f"{self.directory} holds a store made with other settings {differs} "
                             "(stored, requested); choose another folder or delete this one to recapture")
        for shard in existing["shards"]:  # keep the prefix of shards that are whole on disk
            if _shard_rows(self.directory / shard["file"]) != shard["rows"]:
                break
            self._append(shard)
        if "provenance" in existing:  # the first capture's record: a resume in the same setup keeps it
            self.manifest["provenance"] = existing["provenance"]
        self.manifest["complete"] = existing["complete"] and len(self.manifest["shards"]) == len(existing["shards"])

    def _append(self, shard: dict) -> None:
        self.manifest["shards"].append(shard)
        self.manifest["n_rows"] += shard["rows"]
        self.manifest["n_contexts"] += shard["contexts"]

    @property
    def contexts_done(self) -> int:
        """Contexts already stored: a resumed capture starts from this one."""
        return self.manifest["n_contexts"]

    @property
    def is_complete(self) -> bool:
        return self.manifest["complete"]

    def add_shard(self, activations: torch.Tensor, index: dict[str, torch.Tensor], contexts: int) -> None:
        """Write (rows, d_in) activations (cast to the store's dtype, on the CPU) with their per-row
        index (INDEX_FIELDS, one value each per row) as the next shard, covering `contexts` contexts;
        the manifest is rewritten after the shard, both atomically. Returns nothing."""
        if self.is_complete:
            raise RuntimeError(f"{self.directory} is already complete; delete it to recapture")
        if not self.lock.held:
            raise RuntimeError(f"this writer of {self.directory} is closed (finished, closed, or stopped by a failed "
                               "write); open a new StoreWriter there to resume after its last whole shard")
        rows, d_in = activations.shape
        if d_in != self.manifest["d_in"]:
            raise ValueError(f"shard has d_in={d_in}, store expects {self.manifest['d_in']}")
        if sorted(index) != sorted(INDEX_FIELDS) or any(v.shape != (rows,) for v in index.values()):
            raise ValueError(f"index must hold {INDEX_FIELDS}, each with one value per row ({rows})")
        name = f"shard_{len(self.manifest['shards']):05d}.safetensors"
        tensors = {"activations": activations.to("cpu", DTYPES[self.manifest["dtype"]]).contiguous(),
                   **{k: v.to("cpu", torch.int64).contiguous() for k, v in index.items()}}
        data = save_bytes(tensors)  # serialised once: the checksum is of exactly the bytes written
        entry = {"file": name, "rows": rows, "contexts": contexts, CHECKSUM: checksum(data)}
        try:
            with self._writing(name):
                replace_atomically(self.directory / name, lambda tmp: tmp.write_bytes(data))
                _write_json_atomically(self.directory / MANIFEST, {**self.manifest, "shards": [
                    *self.manifest["shards"], entry], "n_rows": self.n_rows + rows,
                    "n_contexts": self.contexts_done + contexts})
        except OSError:
            self.close()  # the rerun the message asks for must not find this folder locked
            raise
        self._append(entry)

    n_rows = property(lambda self: self.manifest["n_rows"])

    def _writing(self, what: str):
        return writing(f"{what} of the activation store", self.directory,
                       kept=f"The {len(self.manifest['shards'])} shards before it are kept and the manifest lists "
                            "only those", then="rerun the capture (notebook 02): it resumes after them")

    def finish(self) -> ActivationStore:
        """Mark the store complete (no more shards), release the lock and return it opened for reading."""
        self.manifest["complete"] = True
        try:
            with self._writing(MANIFEST):
                _write_json_atomically(self.directory / MANIFEST, self.manifest)
        except BaseException:
            self.manifest["complete"] = False
            raise
        finally:
            self.close()
        return ActivationStore(self.directory)


class ActivationStore:
    """Read side of a finished store: opening it validates the manifest against the shards (row
    counts, completeness) and, when given, the expected hook and d_in. Reading never changes the store.
    In notebooks, open stores with `saelab.open_store(profile, split)`, which also checks the profile.
    """

    def __init__(self, directory: str | os.PathLike, hook: str | None = None, d_in: int | None = None):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no activation store at {self.directory} (no {MANIFEST}); "
                                    "run notebook 02_activations first to capture one")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); rerun notebook 02 to rebuild it") from err
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} manifest (format={self.manifest.get('format')!r})")
        if not self.manifest["complete"]:
            raise ValueError(f"the store at {self.directory} is incomplete (capture was interrupted after "
                             f"{self.manifest['n_contexts']} contexts); rerun notebook 02 to resume it")
        if hook is not None and hook != self.hook:
            raise ValueError(f"store holds {self.hook!r} activations, but {hook!r} was asked for; "
                             "capture that hook or use a profile whose hook matches")
        if d_in is not None and d_in != self.d_in:
            raise ValueError(f"store has d_in={self.d_in}, but d_in={d_in} was asked for")
        for shard in self.manifest["shards"]:
            rows = _shard_rows(self.directory / shard["file"])
            if rows != shard["rows"]:
                found = "missing or unreadable" if rows is None else f"{rows} rows"
                raise ValueError(f"{shard['file']} is {found}, but the manifest says {shard['rows']} rows; "
                                 f"the store at {self.directory} is damaged: delete it and rerun notebook 02")

    hook = property(lambda self: self.manifest["hook"])
    d_in = property(lambda self: self.manifest["d_in"])
    n_rows = property(lambda self: self.manifest["n_rows"])
    dtype = property(lambda self: self.manifest["dtype"])
    metadata = property(lambda self: self.manifest["metadata"])

    def shard_paths(self) -> list[Path]:
        """The shard files in row order."""
        return [self.directory / s["file"] for s in self.manifest["shards"]]

    def _read_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        """The one read of a shard that every read path shares: its bytes checked against the checksum
        the manifest recorded (stores captured before checksums are read unchecked), then its tensors
        on the CPU. A damaged shard raises ShardDamaged naming it and how to recapture it."""
        try:
            mapped = map_file(self.directory / shard["file"])
        except (OSError, ValueError) as err:
            raise ShardDamaged(self._damaged(shard, f"cannot be read ({err})")) from err
        found = checksum(mapped) if CHECKSUM in shard else None
        if found != shard.get(CHECKSUM):
            raise ShardDamaged(self._damaged(shard, f"does not match its checksum ({CHECKSUM} {found}; the "
                                                    f"manifest recorded {shard[CHECKSUM]} when it was written)"))
        try:
            return tensors_in(mapped)  # views of the map just hashed: its pages are in memory already
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a store captured before checksums
            raise ShardDamaged(self._damaged(shard, f"is not a readable safetensors file ({err!r})")) from err

    def _damaged(self, shard: dict, what: str) -> str:
        split = self.metadata.get("split", "train")
        return (f"{shard['file']} in the activation store {self.directory} {what}: the file is damaged. Recapture "
                f"just the damaged shards with saelab.data.capture.repair_store(profile, {split!r}) (checks every "
                "shard, recaptures those that fail with the store's settings), or delete the folder and rerun "
                "notebook 02")

    def verify(self, progress: bool = False) -> list[str]:
        """Check every shard's bytes against its checksum: the file names of damaged (or missing, or
        unreadable) shards, [] when the whole store is sound. Reads the whole store once."""
        from tqdm import tqdm

        damaged = []
        for shard in tqdm(self.manifest["shards"], desc="verify", disable=not progress):
            try:
                self._read_shard(shard)
            except ShardDamaged:
                damaged.append(shard["file"])
        return damaged

    @property
    def has_checksums(self) -> bool:
        """False for a store captured before saelab recorded checksums: its shards are read unchecked."""
        return all(CHECKSUM in s for s in self.manifest["shards"])

    def iter_shards(self, device: str | torch.device = "cpu"):
        """Yields each shard in row order as a dict: activations (rows, d_in) in the store's dtype and
        the INDEX_FIELDS (rows,) int64, on `device`, its checksum checked (ShardDamaged if it fails).
        One shard in memory at a time."""
        for shard in self.manifest["shards"]:
            tensors = self._read_shard(shard)
            yield tensors if str(device) == "cpu" else {k: v.to(device) for k, v in tensors.items()}

    def chunks(self, chunk_rows: int = 4096, device: str | torch.device = "cpu", *, whole_contexts: bool = False,
               progress: bool = False, desc: str = "store") -> Iterator[Chunk]:
        """Every row once, in row order, as `Chunk`s of `chunk_rows` rows (fewer at a shard's end): the one
        loop over a store that every pass (MAE, dashboards, baselines, probing) runs. One shard in memory
        at a time. whole_contexts=True never splits a context across chunks (a chunk may then be longer),
        for passes that look at a row's neighbours."""
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r}: rows read at once, an integer >= 1 (default 4096)")
        from tqdm import tqdm  # text bars: a saved notebook keeps their last line

        first_row = 0
        for shard in tqdm(self.iter_shards(), total=len(self.shard_paths()), desc=desc, disable=not progress):
            index = {f: shard[f] for f in INDEX_FIELDS}
            bounds = _context_bounds(index["context"], chunk_rows) if whole_contexts else \
                [(start, min(start + chunk_rows, len(index["context"])))
                 for start in range(0, len(index["context"]), chunk_rows)]
            for start, end in bounds:
                x = shard["activations"][start:end].to(device, torch.float32)  # (rows, d_in)
                yield Chunk(first_row, x, {f: v[start:end] for f, v in index.items()})
                first_row += end - start

    def activations(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """All rows in one (n_rows, d_in) tensor of `dtype` (default float32) on `device`, filled shard
        by shard (no second full copy). Needs n_rows x d_in x 4 bytes: at gpt2 scale ~2 GB."""
        out = torch.empty(self.n_rows, self.d_in, dtype=dtype, device=device)
        start = 0
        for shard in self.iter_shards():
            block = shard["activations"]
            out[start:start + block.shape[0]] = block.to(device, dtype)
            start += block.shape[0]
        return out

    def index(self) -> dict[str, torch.Tensor]:
        """Per-row context, position and token id: a dict of three (n_rows,) int64 tensors."""
        parts = {k: [] for k in INDEX_FIELDS}
        for shard in self.iter_shards():
            for k in INDEX_FIELDS:
                parts[k].append(shard[k])
        return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.int64) for k, v in parts.items()}

    def size_bytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum(p.stat().st_size for p in self.shard_paths())


def replace_shard(store: ActivationStore, file: str, activations: torch.Tensor, index: dict[str, torch.Tensor]) -> bool:
    """Rewrite one shard of a finished store (a recapture of the same contexts, saelab.data.capture.repair_store)
    under the folder's lock, atomically. True when the new bytes match the checksum recorded at capture
    (a bit-identical recapture); otherwise the manifest records the new checksum (another device or library
    version computes the same activations to within rounding) and False is returned."""
    shard = next((s for s in store.manifest["shards"] if s["file"] == file), None)
    if shard is None or activations.shape != (shard["rows"], store.d_in):
        raise ValueError(f"{file} is not a shard of {store.directory} with {activations.shape[0]} rows "
                         f"of d_in {store.d_in}")
    tensors = {"activations": activations.to("cpu", DTYPES[store.dtype]).contiguous(),
               **{k: v.to("cpu", torch.int64).contiguous() for k, v in index.items()}}
    data = save_bytes(tensors)
    same = checksum(data) == shard.get(CHECKSUM)
    with FolderLock(store.directory, "repairing an activation store"), writing(
            f"the recaptured {file}", store.directory, kept="The damaged shard is unchanged",
            then="run repair_store again"):
        replace_atomically(store.directory / file, lambda tmp: tmp.write_bytes(data))
        if not same:
            shard[CHECKSUM] = checksum(data)
            _write_json_atomically(store.directory / MANIFEST, store.manifest)
    return same


def _context_bounds(context: torch.Tensor, chunk_rows: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of at least chunk_rows rows (but the last) that never split a context."""
    n = len(context)
    ends = torch.cat([(context[1:] != context[:-1]).nonzero().squeeze(1) + 1, torch.tensor([n])])  # (contexts,)
    bounds, start = [], 0
    while start < n:
        end = start + chunk_rows
        end = n if end >= n else int(ends[torch.searchsorted(ends, end)])  # the first context end >= end
        bounds.append((start, end))
        start = end
    return bounds
