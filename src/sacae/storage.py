"""Atomic files: write to a temporary name beside the target, fsync, then rename over it."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sacae.errors import SacaeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success it is fsynced and renamed to `path`.

    On any failure the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    # The temporary name keeps the extension: some writers (ffmpeg) choose the format from it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the user's usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_failure(error: OSError, path: str | Path, what: str, needed: int | None = None) -> SacaeError:
    """The sentence for a write that failed: a full disk with the space needed and free, or the system's reason."""
    path = Path(path)
    if error.errno in NO_SPACE:
        try:
            free = f"{shutil.disk_usage(path.parent if not path.is_dir() else path).free / 1e6:.1f} MB are free"
        except OSError:
            free = "the free space cannot be read"
        need = f"it needs about {needed / 1e6:.1f} MB and " if needed else ""
        return SacaeError(
            f"The disk is full: writing {what} ({path}) failed; {need}{free}. Free some space and run the same "
            f"command again to resume from the last checkpoint."
        )
    reason = error.strerror or str(error)
    return SacaeError(
        f"Could not write {what} ({path}): {reason}. Make the folder writable and run the same command again to "
        f"resume from the last checkpoint."
    )


@contextlib.contextmanager
def writing(path: str | Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn an OSError raised inside into one sentence naming `what` was being written (see write_failure)."""
    try:
        yield
    except OSError as e:
        raise write_failure(e, path, what, needed) from None


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_torch_atomic(obj, path: str | Path) -> None:
    """torch.save through a buffer, so that a failed write is an OSError (torch's own writer raises RuntimeError)."""
    import torch  # here, so that the commands that only read runs (status, report) do not load torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def load_torch(path: str | Path, map_location=None):
    """torch.load with weights_only=True (no code runs); a damaged file gets one sentence naming it."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise SacaeError(f"There is no file {path}.") from None
    except Exception as e:
        raise SacaeError(f"{path} is not a readable sacae snapshot ({type(e).__name__}: {e}).") from None


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove that files can be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SacaeError(f"The work dir {folder} is not writable ({e.strerror}).") from None
    return folder
