"""Where training metrics go: wandb (optional, mode from WANDB_MODE) and a local history file.

The local history (`history.csv` in the run folder, one row per epoch) is what the notebooks
chart, so figures never depend on wandb. wandb's mode is `$WANDB_MODE` when set ("online",
"offline" or "disabled"); otherwise "online" when wandb has an API key, else "offline", which
writes `<dir>/wandb/offline-run-*` for a later `wandb sync`.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import pandas as pd

from saelab.paths import replace_atomically

WANDB_MODES = ("online", "offline", "disabled")
HISTORY = "history.csv"


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        if mode not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={mode!r}: use one of {WANDB_MODES}")
        return mode
    return "online" if _wandb_logged_in() else "offline"


def _wandb_logged_in() -> bool:
    """`wandb login` stores its key in ~/.netrc (or WANDB_API_KEY is set): presence is all we check."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class RunLog:
    """One training run's sinks. `log` sends a flat dict of floats to wandb (when enabled);
    `write_history` writes the per-epoch rows (the loop keeps them) to history.csv. wandb prints
    nothing (a notebook's output stays readable) and still logs."""

    def __init__(self, run_dir: Path | None, config: dict, run_id: str | None = None, name: str | None = None):
        self.run_dir, self.wandb_run = run_dir, None
        if run_dir is not None and wandb_mode() != "disabled":
            import wandb  # deferred: a few seconds to import

            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "saelab"), name=name,
                                        dir=os.environ.get("WANDB_DIR", str(run_dir)), mode=wandb_mode(),
                                        config=config, id=run_id, resume="allow" if run_id else None,
                                        settings=wandb.Settings(silent=True, console="off", disable_git=True))

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, values: dict, step: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    @staticmethod
    def write_history(run_dir: Path | None, rows: list[dict]) -> pd.DataFrame:
        history = pd.DataFrame(rows)
        if run_dir is not None:
            replace_atomically(run_dir / HISTORY, lambda tmp: history.to_csv(tmp, index=False))
        return history

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
