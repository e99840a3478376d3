"""A checkpoint directory's manifest: every file with its size and sha256, written last and atomically.

A checkpoint is used only when every file the manifest lists is there, whole and unchanged, so a truncated or
replaced file is found before anything is read from it. (The manifest guards against damage, not against a
writer who rewrites it too: that is the job of reading `.pt` files with `weights_only=True`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["MANIFEST", "TRAINER_STATE", "verify_checkpoint", "write_manifest"]

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"  # every checkpoint has one: the manifest must list it
MANIFEST_FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Records every file of `directory` with its size and sha256 in `manifest.json`, atomically."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }
    temporary = directory / f".{MANIFEST}.tmp"
    with open(temporary, "w") as handle:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / MANIFEST)


def verify_checkpoint(directory: Path) -> dict[str, dict] | str:
    """The manifest's file table when every file it lists is there with its size and checksum (and the
    trainer state is among them); otherwise what is wrong, as a short phrase."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
        digests = {name: str(entry["sha256"]) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by an older version)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__}: {error})"
    if TRAINER_STATE not in files:
        return f"{MANIFEST} lists no {TRAINER_STATE}"
    for name, size in sizes.items():
        path = directory / name
        if os.path.basename(name) != name or not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size} (truncated or replaced)"
        if _sha256(path) != digests[name]:
            return f"{name} does not match its sha256 in {MANIFEST} (damaged or replaced)"
    return files
