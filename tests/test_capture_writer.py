"""Capture's background shard writer: shards leave the capture loop's thread, in order, and a failure
there stops the capture with the error while the shards already written stay for a resume."""

import threading

import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab.data import capture, lm
from saelab.data.tokens import load_tokens
from saelab.store import StoreWriter


def test_shards_are_written_off_the_capture_thread_in_order(tiny, monkeypatch):
    threads, add_shard = [], StoreWriter.add_shard
    monkeypatch.setattr(StoreWriter, "add_shard",
                        lambda self, *a: (threads.append(threading.current_thread()), add_shard(self, *a))[1])
    store = capture.capture_activations(tiny, device="cpu", lm=lm.load_lm(tiny, "cpu"), progress=False)
    assert len(threads) == len(store.manifest["shards"]) > 1
    assert threading.main_thread() not in threads
    contexts = store.index()["context"]
    assert torch.equal(contexts, contexts.sort().values)  # context order, shard after shard
    assert store.n_rows == len(load_tokens(tiny)) * (tiny.context_size - 1)


def test_a_failing_write_stops_the_capture_and_a_rerun_resumes(tiny, monkeypatch):
    model, add_shard, calls = lm.load_lm(tiny, "cpu"), StoreWriter.add_shard, []

    def second_fails(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return add_shard(self, *args)

    with monkeypatch.context() as patched:
        patched.setattr(StoreWriter, "add_shard", second_fails)
        with pytest.raises(OSError, match="No space left"):
            capture.capture_activations(tiny, device="cpu", lm=model, progress=False)
    store = capture.capture_activations(tiny, device="cpu", lm=model, progress=False)  # resumes after shard 1
    assert store.manifest["complete"] and store.n_rows == len(load_tokens(tiny)) * (tiny.context_size - 1)
    assert torch.equal(store.index()["context"], torch.arange(len(load_tokens(tiny))).repeat_interleave(15))
