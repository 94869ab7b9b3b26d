"""The one way semcorr writes files: atomically, with ordinary permissions, naming the user's path.

A file appears whole or not at all. It is written to a temporary file in the *same* directory
(one file system, so the rename is atomic), flushed and ``fsync``-ed, given the permissions an
ordinary ``open()`` would give (``0o666`` minus the umask; ``mkstemp`` alone leaves ``0o600``) and
renamed over the target with ``os.replace``. A crash leaves the previous file, or none, never a
truncated one. Folders (model directories, checkpoints, datasets) are built under a temporary
sibling and renamed into place the same way (:func:`atomic_directory`).

Errors name the path the user asked for, never the temporary one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_BLOCK = 1 << 20


# -- checksums and JSON ------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, not JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_safe(value):
    """``value`` as strict JSON data: NaN / inf -> None, numpy scalars -> Python, paths -> str, tuples -> lists."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


# -- files -------------------------------------------------------------------------------------------
def _ordinary_mode(directory: bool = False) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _user_error(path: Path, error: OSError, action: str = "write") -> OSError:
    reason = error.strerror or str(error)
    return OSError(error.errno, f"cannot {action} {path}: {reason}") if error.errno else OSError(f"cannot {action} {path}: {reason}")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early -- before any work -- when ``path`` could not be written.

    The nearest existing folder above ``path`` must be writable (missing folders are created at
    write time) and ``path`` must not be a folder.

    Raises:
        ValueError: naming ``path`` and what is wrong.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder; give a file name")
    folder = path.parent
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: the folder {folder} is not writable")
    return path


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None]) -> Path:
    """Write ``path`` by calling ``save(temporary_path)``, then rename the result into place.

    ``save`` is any writer that takes a path (``image.save``, ``safetensors.torch.save_file``, ...).
    The temporary file keeps ``path``'s suffix, so writers that pick a format by extension work.

    Returns:
        ``path``. Raises ``OSError`` naming ``path`` (not the temporary file) when writing fails.
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as error:
        raise _user_error(path, error) from None
    os.close(descriptor)
    temporary = Path(temporary)
    try:
        save(temporary)
        _fsync(temporary)
        os.chmod(temporary, _ordinary_mode())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _user_error(path, error) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_save(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (NaN / inf become ``null``; see :func:`json_safe`) atomically."""
    text = json.dumps(json_safe(value), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


# -- folders -----------------------------------------------------------------------------------------
def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a finished ``staging`` folder to ``target``, replacing an existing ``target``.

    Every file below ``staging`` is ``fsync``-ed first. An existing ``target`` is renamed aside,
    the new folder renamed into place, then the old one removed: at every moment ``target`` is
    either the old folder or the new one.
    """
    staging, target = Path(staging), Path(target)
    for file in staging.rglob("*"):
        if file.is_file():
            _fsync(file)
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(staging, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_directory(target.parent)
    return target


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; rename it to ``path`` when the block succeeds.

    Yields the staging folder. On an exception the staging folder is removed and ``path`` is
    untouched. With ``overwrite=False`` an existing ``path`` is kept and the new copy dropped (for
    caches that several processes may fill at once with identical content).
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as error:
        raise _user_error(path, error) from None
    try:
        yield staging
        os.chmod(staging, _ordinary_mode(directory=True))
        if overwrite:
            replace_directory(staging, path)
        elif not path.exists():
            try:
                os.replace(staging, path)
            except OSError:  # another process put its (identical) copy there first
                if not path.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
