"""timm, imported without Weights & Biases.

`timm.utils.summary` runs `import wandb` when timm is imported, for its own training script's `log_wandb` option,
which this project never calls. Where wandb is installed (conf/logger/wandb.yaml needs it), that import is most of
timm's import time (about 0.7 s of 1.7 s on this project's 2-core CPU, measured under load 2026-12-06) and wraps
`sys.stdout` and `sys.stderr` for wandb's console capture, in every run that logs nothing to wandb.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_timm() -> ModuleType:
    """The `timm` package; on its first import, `import wandb` inside it fails as if wandb were not installed (timm
    catches that), and wandb stays importable for whoever asks for it afterwards (`logger=wandb`)."""
    if "timm" in sys.modules or "wandb" in sys.modules:
        import timm

        return timm
    sys.modules["wandb"] = None  # the import system's "not installed" marker: `import wandb` raises ImportError
    try:
        import timm
    finally:
        del sys.modules["wandb"]
    return timm
