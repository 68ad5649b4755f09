"""Content hashes and atomic folder replacement, shared by checkpoints, features and generated catalogues."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks so large weight files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_folder(staged: Path, target: Path) -> None:
    """Put the complete folder `staged` at `target`, replacing any previous one: a reader of `target`
    finds the old folder or the new one, never a half-written mix."""
    if not target.exists():
        os.replace(staged, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)
