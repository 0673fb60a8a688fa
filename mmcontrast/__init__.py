"""mmcontrast: CLIP-style contrastive learning on open_clip, Accelerate and webdataset.

The package root stays light: heavy modules (torch, open_clip) are imported on first use of
``load`` or ``ZeroShotClassifier`` so that ``mmcontrast --help`` answers at once.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load", "ZeroShotClassifier", "UsageError"]

from mmcontrast.errors import UsageError  # noqa: E402  (tiny, no heavy imports)


def __getattr__(name: str) -> Any:
    if name == "load":
        from mmcontrast.loading import load

        return load
    if name == "ZeroShotClassifier":
        from mmcontrast.zeroshot import ZeroShotClassifier

        return ZeroShotClassifier
    raise AttributeError(f"module 'mmcontrast' has no attribute {name!r}")
