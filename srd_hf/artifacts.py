"""Stage artifacts that are either whole or absent, and that say what made them.

One scheme for every stage:

- a folder artifact (a model, a dataset, a policy) is written into a hidden staging folder
  beside its place (``.<name>.tmp-*``), its marker ``_COMPLETE.json`` last, and renamed into
  place: a killed stage leaves a staging folder (cleared by the next run), never a torn
  artifact;
- a stage that works in place (a Trainer's ``output_dir`` with its ``checkpoint-*``) writes
  ``_STARTED.json`` first and ``_COMPLETE.json`` last, its pieces each written the same way;
- a file artifact (``results.json``) is written to a temporary file and ``os.replace``-d;
- both markers hold the *fingerprint*: the settings that shape the artifact, and their hash.
  Found with other settings, a stage stops and names them (``StaleArtifactError``) instead of
  silently reusing (or resuming from) what other settings made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COMPLETE = "_COMPLETE.json"
STARTED = "_STARTED.json"
STAGING_TAG = ".tmp-"


class StaleArtifactError(ValueError):
    """An artifact exists but was made with other settings than the ones asked for."""


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def digest(fingerprint: dict) -> str:
    """Short stable hash of a fingerprint (key order and tuples vs lists do not matter)."""
    return hashlib.sha256(json.dumps(_canonical(fingerprint), sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: str | os.PathLike, data, **kwargs) -> Path:
    """Write JSON through a temporary file and ``os.replace``: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{STAGING_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, **{"indent": 2, "default": float, **kwargs})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{STAGING_TAG}", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


def _marker(fingerprint: dict) -> dict:
    return {"fingerprint": _canonical(fingerprint), "hash": digest(fingerprint)}


def read_marker(folder: str | os.PathLike, name: str = COMPLETE) -> dict | None:
    try:
        marker = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "hash" in marker else None


def is_complete(folder: str | os.PathLike) -> bool:
    return read_marker(folder) is not None


def recorded_hash(folder: str | os.PathLike) -> str | None:
    """The hash of a complete artifact (what a downstream fingerprint cites), else None."""
    marker = read_marker(folder)
    return marker["hash"] if marker else None


def differences(recorded: dict, wanted: dict) -> dict:
    """``{setting: (recorded, wanted)}`` for every top-level setting that differs."""
    recorded, wanted = _canonical(recorded), _canonical(wanted)

    def text(value):  # as hashed: 8 and 8.0 differ there, so they differ here
        return json.dumps(value, sort_keys=True)

    return {k: (recorded.get(k), wanted.get(k)) for k in sorted(set(recorded) | set(wanted))
            if text(recorded.get(k)) != text(wanted.get(k))}


def _check(folder: Path, marker: dict, fingerprint: dict, what: str) -> None:
    if marker["hash"] != digest(fingerprint):
        diff = differences(marker.get("fingerprint", {}), fingerprint)
        raise StaleArtifactError(
            f"{folder} ({what}) was made with other settings (recorded -> asked): "
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            + ". Pass --overwrite_output_dir to redo it, or another --output_dir."
        )


def reusable(folder: str | os.PathLike, fingerprint: dict, what: str = "artifact") -> bool:
    """True when ``folder`` is complete with these settings; False when it is absent or torn;
    ``StaleArtifactError`` when it is complete with other settings."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return False
    _check(folder, marker, fingerprint, what)
    return True


def begin(folder: str | os.PathLike, fingerprint: dict, what: str = "stage", *, write: bool = True) -> None:
    """Open a stage that works in place: refuse checkpoints another configuration left, then
    record this configuration (before anything else is written; ``write=False``: check only)."""
    folder = Path(folder)
    started = read_marker(folder, STARTED)
    if started is not None:
        _check(folder, started, fingerprint, what)
        return
    if folder.is_dir() and any(p.name.startswith("checkpoint-") for p in folder.iterdir()):
        raise StaleArtifactError(f"{folder} holds checkpoints of an unrecorded run ({what}); pass --overwrite_output_dir to start over")
    if write:
        write_json(folder / STARTED, _marker(fingerprint))


def finish(folder: str | os.PathLike, fingerprint: dict, **extra) -> None:
    """Close a stage: its marker, last."""
    write_json(Path(folder) / COMPLETE, {**_marker(fingerprint), **extra})


def clear_leftovers(parent: str | os.PathLike) -> list[Path]:
    """Remove staging folders and files killed writers left in ``parent``."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.name.startswith(".") and STAGING_TAG in p.name]
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


@contextmanager
def staged(folder: str | os.PathLike, fingerprint: dict | None = None, **extra) -> Iterator[Path]:
    """Yield a staging folder beside ``folder``; on success write the marker in it last and
    rename it into place (replacing an old ``folder``); on failure remove it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{STAGING_TAG}", dir=folder.parent))
    try:
        yield tmp
        if fingerprint is not None:
            write_json(tmp / COMPLETE, {**_marker(fingerprint), **extra})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_dataset(dataset, folder: str | os.PathLike, fingerprint: dict) -> Path:
    """``Dataset.save_to_disk`` into place atomically, with its marker."""
    with staged(folder, fingerprint) as tmp:
        dataset.save_to_disk(str(tmp))
    return Path(folder)


def remove(paths) -> None:
    """Remove artifacts (``--overwrite_output_dir``): folders, files, missing ones ignored."""
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
