"""Runs a capture that kills its own process (os._exit: no cleanup, like SIGKILL) part-way.

    python capture_driver.py PROFILE.json N after_shard|before_manifest

after_shard: dies right after the N-th shard and its manifest are written.
before_manifest: dies when the N-th shard file is in place but the manifest does not list it yet.
"""

import os
import sys

from saelab import capture, store
from saelab.config import load_profile

profile_json, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = {"shards": 0, "manifests": 0}
add_shard, write_json = store.StoreWriter.add_shard, store._write_json_atomically


def add_shard_then_die(self, *args, **kwargs):
    add_shard(self, *args, **kwargs)
    calls["shards"] += 1
    if mode == "after_shard" and calls["shards"] == n:
        os._exit(17)


def write_json_or_die(path, payload):
    calls["manifests"] += 1
    if mode == "before_manifest" and calls["manifests"] == n:
        os._exit(17)
    write_json(path, payload)


store.StoreWriter.add_shard = add_shard_then_die
store._write_json_atomically = write_json_or_die
capture.capture_activations(load_profile(profile_json), device="cpu", progress=False)
sys.exit(0)  # the capture finished before dying: the test fails on this exit code
