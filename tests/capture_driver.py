"""Runs a capture that kills its own process (os._exit: no cleanup, like SIGKILL) part-way.

    python capture_driver.py PROFILE.json N          # dies
    python capture_driver.py PROFILE.json N hold     # pauses there, holding the store, until stdin closes

Dies (or pauses) when the N-th shard file has been renamed into place but the manifest does not list it yet.
"""

import os
import sys

from saelab import store
from saelab.config import load_profile
from saelab.data import capture

profile_json, n = sys.argv[1], int(sys.argv[2])
hold = sys.argv[3:] == ["hold"]
calls = {"manifests": 0}
write_json = store._write_json_atomically


def write_json_or_die(path, payload):
    """StoreWriter.add_shard renames the shard, then calls this for the manifest."""
    calls["manifests"] += 1
    if calls["manifests"] == n:
        if not hold:
            os._exit(17)
        print("holding", flush=True)  # another capture of this store runs now, and must be refused
        sys.stdin.read()
    write_json(path, payload)


store._write_json_atomically = write_json_or_die
capture.capture_activations(load_profile(profile_json), device="cpu", progress=False)
sys.exit(0)  # finished: what "hold" expects; without it the test fails on this exit code
