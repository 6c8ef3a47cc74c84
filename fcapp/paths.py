"""Where fcapp finds its files: the data it ships, one user data folder (overridable with $FCAPP_HOME)
and a cache of files derived from the shipped data (overridable with $FCAPP_CACHE)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(relative: str) -> Path:
    """A data file that comes with fcapp, e.g. shipped("gsm8k/train.jsonl"). An installed wheel
    carries the checkout's assets/ inside the package as fcapp/assets (pyproject.toml maps it
    there); a checkout, run as it is or installed editable, has it beside the package."""
    roots = (_PACKAGE / "assets", _PACKAGE.parent / "assets")
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(f"{relative} is missing from this fcapp installation (looked in "
                            f"{' and '.join(str(root) for root in roots)}): reinstall fcapp")


def data_home() -> Path:
    """$FCAPP_HOME, else $XDG_DATA_HOME/fcapp, else ~/.local/share/fcapp (created on demand)."""
    if os.environ.get("FCAPP_HOME"):
        root = Path(os.environ["FCAPP_HOME"])
    else:
        root = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "fcapp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_dir(name: str) -> Path:
    """A folder of the data home (models, exports, uploads), created on demand."""
    path = data_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """$FCAPP_CACHE, else $XDG_CACHE_HOME/fcapp, else ~/.cache/fcapp (created on demand): derived files
    named by a hash of what they are derived from, so every data home (each test's, each user's) can
    share them and a stale one is never read."""
    root = Path(os.environ.get("FCAPP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "fcapp")
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Tuned models live here, one folder per name."""
    return data_dir("models")


def safe_name(name: str, what: str = "name") -> str:
    """A user-given name that is safe as one folder name (no traversal, no separators)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or ".." in name:
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' (no path separators)")
    return name
