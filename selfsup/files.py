"""The files a run writes: verified, atomic checkpoints (a crash mid-write never leaves a torn
`last.pt`, a damaged one is detected on load and the previous one used), the JSON-lines metrics
log (a line torn by a kill loses nothing before it), the claim of a new folder and the lock of a
folder in use (two processes never share one), and output paths given as folders."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # {"format", "sha256", "payload": the torch.save bytes of the state}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file, what is wrong
    and what to do (a ValueError: the CLI prints it as one line)."""


def make_folder(path: str | Path, option: str) -> Path:
    """Create the folder `path` with its parents, or raise a ValueError that names `option` (the
    setting it came from), what stood in the way and what to do."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):
            reason = f"{_blocking_file(path)} is a file, not a folder"
        raise ValueError(
            f"{option}: cannot create the folder {path}: {reason}; choose another {option}"
        ) from None
    return path


def _blocking_file(path: Path) -> Path:
    """The first of `path` and its parents that exists as something other than a folder."""
    for part in reversed([path, *path.parents]):
        if part.exists() and not part.is_dir():
            return part
    return path


def output_file(output: str | Path, default_name: str, option: str) -> Path:
    """The file an output option names: `output` itself, or `default_name` inside it when it is
    a folder (an existing one, or one written with a trailing slash: made here). Its folder is
    made; a ValueError naming `option` when that cannot be done or the file would be a folder."""
    path = Path(output)
    if path.is_dir() or str(output).endswith(("/", os.sep)):
        path = make_folder(path, option) / default_name
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a folder, not a file; give the file to write")
    make_folder(path.parent, option)
    return path


def create_exclusive(path: Path, text: str) -> bool:
    """Write `text` to `path` unless it exists: True for the one process of many that creates it.
    The text goes to a temporary file that is then hard-linked to `path`; the link is atomic and
    fails where `path` exists, so no reader ever sees `path` half written."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class FolderInUseError(ValueError):
    """A folder that a live process holds (`hold_folder`)."""


LOCK_FILE = ".lock"


@contextmanager
def hold_folder(folder: str | Path, label: str = "run folder", way_out: str = "") -> Iterator[None]:
    """Hold the lock of `folder` (an flock on <folder>/.lock, which names the holder) until the
    block ends. The kernel releases it when its process ends, even by kill -9: a lock file left
    behind is then free and taken over. A held one raises FolderInUseError naming the holder;
    `label` names the folder in that message and `way_out` adds another fix."""
    path = Path(folder) / LOCK_FILE
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode(errors="replace").strip()
            raise FolderInUseError(
                f"{label} {folder} is in use by {holder or 'another process'}; wait for it to "
                f"finish or stop it{way_out}"
            ) from None
        except OSError as error:  # a file system without locks: go on, unguarded
            logger.warning(
                f"selfsup: warning: cannot lock {path} ({error.strerror}); nothing stops a second "
                f"process from using {folder} at the same time"
            )
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"process {os.getpid()} on {socket.gethostname()} (since {since})\n"
        os.ftruncate(handle, 0)
        os.pwrite(handle, holder.encode(), 0)
        yield
    finally:
        # closing releases the lock; the file stays, as deleting it would let a process that
        # opened it before the deletion and one that creates it anew both hold "the" lock
        os.close(handle)


def merge_json(path: Path, update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read the JSON object in `path` ({} where there is none), let `update` change it in place,
    write it back and return it: under an exclusive flock of `.<name>.lock` beside it, so two
    processes that add results to one file at once (`selfsup eval` and `selfsup stats` of one
    run) both keep theirs, and through a temporary file renamed into place, so a reader never
    sees half a file. The lock file stays (deleting it would let two processes hold "the" lock)."""
    handle = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # waits (the holder only reads and writes a file); a file system without locks: unguarded
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        update(merged)
        tmp.write_text(json.dumps(merged, indent=1))
        os.replace(tmp, path)
        return merged
    finally:
        os.close(handle)
        tmp.unlink(missing_ok=True)


def save_atomic(state: dict[str, Any], path: Path, previous: Path | None = None) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`; with
    `previous`, the file `path` held moves there first (the last two stay on disk). A failed
    write (disk full, unwritable folder) raises CheckpointError and leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except OSError as error:
        reason = error.strerror or str(error)
        hint = "free some disk space" if error.errno == errno.ENOSPC else "make it writable"
        raise CheckpointError(
            f"could not write the checkpoint {path}: {reason}; the previous checkpoint is "
            f"intact. {hint.capitalize()} ({path.parent}) and resume with "
            f"`selfsup train --resume {path.parent.parent}`"
        ) from error
    finally:
        tmp.unlink(missing_ok=True)


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before `path` is kept (checkpoints/last.pt -> previous.pt)."""
    return path.with_name("previous.pt")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a training state with its SHA-256, keeping the one before as previous.pt.

    torch's zip reader notices truncation but not flipped bytes inside a tensor (they load
    silently), so the digest of the serialised state is stored beside it and checked on load.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    wrapped = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(payload, dtype=torch.uint8),
    }
    save_atomic(wrapped, path, previous=previous_checkpoint(path))
    del wrapped, payload  # release the view before the buffer


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file, verified: a CheckpointError naming the file and what is wrong with
    it for an empty, truncated, corrupted or foreign file. Loading never executes code
    (weights-only unpickling)."""
    state = _load_weights_only(path, path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        payload = state.get("payload")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
            raise CheckpointError(f"checkpoint {path} is damaged: its payload is missing")
        data = payload.numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != state.get("sha256"):
            raise CheckpointError(
                f"checkpoint {path} is corrupted: its content does not match the SHA-256 stored "
                f"when it was written (a damaged disk or copy)"
            )
        state = _load_weights_only(io.BytesIO(data), path)
    if not isinstance(state, dict) or "method" not in state or "step" not in state:
        kind = type(state).__name__ if not isinstance(state, dict) else "dict without 'method'"
        raise CheckpointError(
            f"{path} is not a selfsup training checkpoint (it holds a {kind}); runs write "
            f"checkpoints/last.pt with `selfsup train` (weights from `selfsup export` are not one)"
        )
    return state


def _load_weights_only(source: Path | io.BytesIO, path: Path) -> Any:
    if isinstance(source, Path) and source.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its save was interrupted")
    if isinstance(source, Path) and not zipfile.is_zipfile(source):  # torch.save writes a zip
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file (no complete zip archive)"
        )
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects that weights-only loading refuses ({_first_line(error)});"
            f" selfsup never loads a checkpoint in a way that could run code"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file ({_first_line(error)})"
        ) from error


def one_line(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line (torch's state-dict errors span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:limit]


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:100]}" if lines else type(error).__name__


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, verified; when it is missing or damaged and the one before it
    (previous.pt) is good, that one, with a warning on stderr naming both."""
    previous = previous_checkpoint(path)
    if not path.is_file() and not previous.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; was the run started and saved?")
    try:
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is missing (a save stopped between renames)")
        return read_checkpoint(path)
    except CheckpointError as error:
        if not previous.is_file():
            raise
        try:
            state = read_checkpoint(previous)
        except CheckpointError as second:
            raise CheckpointError(f"{error}; and the one before it: {second}") from second
        logger.warning(
            f"selfsup: warning: {error}; using the previous checkpoint {previous} "
            f"(step {state['step']})"
        )
        return state


def load_weights(method: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load the method weights of the checkpoint at `path` (load_checkpoint) into `method`;
    returns the checkpoint. A checkpoint of another model is a CheckpointError naming the keys
    that differ, not torch's traceback."""
    state = load_checkpoint(path)
    try:
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path} holds the weights of another model than this run's "
            f"{type(method).__name__} ({one_line(error)}); was the run folder's "
            f"checkpoints/ copied from another run?"
        ) from error
    return state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Appends one JSON object per line; `truncate_after(step)` drops what a resumed run redoes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill: everything before it is intact
    return records
