"""Where the reference data shipped beside the project lives (PartiPrompts, COCO captions, COCO photos).

    from data_pipeline.shared_data import shared_path
    shared_path("PartiPrompts.tsv")          # $PARTI_SHARED_DATA/PartiPrompts.tsv, default ../shared/data/...
    resolve("shared:coco_30k.csv")           # the same for config values; other paths are returned as they are

The files are read in place, never copied. Outside this setup, download them from their public sources:
PartiPrompts.tsv from github.com/google-research/parti, COCO captions (annotations_trainval2014/2017.zip)
from cocodataset.org.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("PARTI_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def shared_path(name: str) -> Path:
    path = shared_data_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: set PARTI_SHARED_DATA to the folder of the shared reference "
                                f"data (see data_pipeline/shared_data.py for where each file comes from)")
    return path


def resolve(path: str | Path) -> Path:
    """'shared:NAME' -> shared_path(NAME); anything else unchanged."""
    text = str(path)
    return shared_path(text.removeprefix("shared:")) if text.startswith("shared:") else Path(text)
