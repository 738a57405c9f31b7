"""Safe file I/O: atomic writes, one writer per output folder, and weight files read
without ever executing their content."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from logquant.errors import LogquantError


class CheckpointError(LogquantError):
    """A weights file that is missing, unreadable or does not fit the model."""


class OutputError(LogquantError):
    """An output path that cannot be written, or a folder another process is writing."""


LOCK_FILE = ".logquant.lock"

JSON_MAX_DEPTH = 32  # every JSON document logquant reads is a few levels deep
JSON_MAX_BYTES = 64 << 20


class JsonError(LogquantError):
    """A JSON document (config, manifest, file header) that cannot be read safely."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, where: str) -> object:
    """Parse untrusted JSON (a file, a header): any malformed, deeply nested, oversized or
    non-UTF-8 document, NaN/Infinity constants and integers of thousands of digits are one
    ``JsonError`` naming ``where``, never a RecursionError, ValueError or slow parse."""
    if len(text) > JSON_MAX_BYTES:
        raise JsonError(f"{where}: {len(text):,} bytes of JSON exceeds the "
                        f"{JSON_MAX_BYTES:,}-byte limit")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise JsonError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise JsonError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise JsonError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # an integer beyond Python's digit limit, NaN, Infinity
        raise JsonError(f"{where}: bad JSON value ({str(exc).splitlines()[0][:80]})") from None
    stack = [(value, 1)]
    while stack:  # depth, without recursion
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            raise JsonError(f"{where}: JSON nested deeper than {JSON_MAX_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else ()
        stack.extend((child, depth + 1) for child in children)
        if isinstance(item, float) and not abs(item) < float("inf"):
            raise JsonError(f"{where}: a number too large for a float ({item})")
    return value


def read_json(path: str | os.PathLike, what: str = "") -> object:
    """``parse_json`` of a file; an unreadable file is a one-line error too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JsonError(f"{path}: cannot read {what or 'the file'} ({exc.strerror})") from None
    return parse_json(data, f"{path}" + (f" ({what})" if what else ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.PID.*.tmp`` files left beside ``path`` by killed processes."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    A reader sees the old file or the complete new one, never a partial one, even if the
    process is killed (SIGKILL included; no fsync, so a power loss is the filesystem's
    matter).
    The temporary file carries the writer's pid, so later writes remove those a killed
    process left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_path(path: str | os.PathLike, folder: bool = False, *,
                      suffixes: tuple[str, ...] = (), inputs=(),
                      foreign_ok: bool = False) -> Path:
    """``path`` if it can become the output file (or ``folder``), checked before any work.

    The one rule for what a command may write: a file only with one of ``suffixes`` (when
    given), never onto one of the command's ``inputs``, never over a device, FIFO, socket
    or other non-regular file; a folder only if it is new, empty, or was written by
    logquant before (it holds logquant's lock file), unless ``foreign_ok`` (the caller
    checks the contents itself, as sweep does with its manifest). Also refused: a file where
    a folder is needed or the other way round, or an ancestor that is a file.
    """
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise OutputError(f"{path}: exists and is not a {kind}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{path}: cannot create the output {kind}: {parent} is "
                                  "a file")
            break
    if folder:
        if not foreign_ok and path.is_dir() and not (path / LOCK_FILE).exists() and any(
                entry.name != LOCK_FILE for entry in os.scandir(path)):
            raise OutputError(f"{path}: holds files that logquant did not write; choose a "
                              "new or empty folder")
        return path
    if suffixes and path.suffix not in suffixes:
        raise OutputError(f"{path}: the output file name must end in "
                          f"{' or '.join(suffixes)}")
    if path.exists() or path.is_symlink():
        import stat

        mode = os.stat(path).st_mode if path.exists() else 0
        if not stat.S_ISREG(mode):
            raise OutputError(f"{path}: exists and is not a regular file (a device, FIFO, "
                              "socket or dangling link); logquant replaces regular files only")
        for source in inputs:
            if source is not None and Path(source).exists() and os.path.samefile(path, source):
                raise OutputError(f"{path}: is also an input of this command ({source}); "
                                  "write the output elsewhere")
    return path


_held: dict[Path, int] = {}  # folders this process has locked -> nesting depth


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder`` (created if needed) for this process: another logquant process that
    tries to write there at the same time is refused with :class:`OutputError` instead of
    interleaving its files. The operating system drops the lock when the holder exits,
    however it exits (SIGKILL included), so a killed run never blocks the rerun."""
    import fcntl

    folder = check_output_path(folder, folder=True, foreign_ok=True)  # callers checked it
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:  # re-entered by the same process (a command calling another)
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputError(f"{folder}: another logquant process (pid {holder}) is writing "
                          "there; wait for it to finish or choose another output") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = 1
        yield folder
    finally:
        _held.pop(key, None)
        if created and os.listdir(folder) == [LOCK_FILE]:  # a run that wrote nothing
            with contextlib.suppress(OSError):
                os.unlink(folder / LOCK_FILE)
                folder.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)  # otherwise the file stays: unlinking it races with another opener


def holds_only(folder: Path, names: set[str]) -> bool:
    """Whether every entry of ``folder`` is one of ``names`` or logquant's lock file."""
    return set(os.listdir(folder)) <= names | {LOCK_FILE}


def check_replaceable(path: str | os.PathLike, kind: str,
                      is_kind: Callable[[Path], bool]) -> None:
    """OutputError unless the folder ``path`` is absent, empty (its lock file aside) or
    ``is_kind(path)``: what :func:`staged_folder` checks, for callers to check first."""
    path = Path(path)
    if path.is_dir() and any(e.name != LOCK_FILE for e in os.scandir(path)) and \
            not is_kind(path):
        raise OutputError(f"{path}: holds files that are not logquant {kind}; choose a new "
                          "or empty folder")


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, kind: str,
                  is_kind: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path`` to write a multi-file output into; on
    success it replaces ``path`` whole, so readers see the old set of files or the new
    one, never a mixture or stale files beside new ones. An existing ``path`` is replaced
    only if it is empty or ``is_kind(path)`` (a ``kind`` output logquant wrote); otherwise
    OutputError before any work. On failure the staged files are removed and ``path`` is
    untouched. Two processes writing the same ``path`` at once: one wins whole, the other
    gets OutputError."""
    import shutil

    path = Path(path)
    check_replaceable(path, kind, is_kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial",
                                  dir=path.parent))
    try:
        yield stage
        (stage / LOCK_FILE).touch()  # marks the folder as logquant's (check_output_path)
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = stage.with_suffix(".old")
        if path.is_dir():
            os.rename(path, old)
        try:
            os.rename(stage, path)
        except OSError:
            if old.exists() and not path.exists():
                os.rename(old, path)
            raise OutputError(f"{path}: another process wrote it at the same time; "
                              "rerun") from None
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def writer_lock(out: str | os.PathLike) -> contextlib.AbstractContextManager:
    """The :func:`output_lock` of ``out`` on the process that writes it (rank 0 under
    torchrun; the other ranks only compute), so that a second run into ``out`` is refused."""
    from logquant.distributed import init_distributed

    rank, _ = init_distributed()
    return output_lock(out) if rank == 0 else contextlib.nullcontext()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB pieces: what manifests record of weights."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_weights(model: nn.Module, path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write the model's state_dict as safetensors (atomically), with string metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors, or from a torch file loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; report it as bad input
        raise CheckpointError(f"{path}: not a loadable weights file ({_load_failure(exc)}); "
                              "logquant reads tensors only, never pickled code: save the "
                              "state_dict with safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    return obj


def _load_failure(exc: Exception) -> str:
    """The line of torch.load's message that says what is wrong (not its advice to load
    with weights_only=False, which would run the file's code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("Unsupported")),
                  lines[0] if len(lines) == 1 else "not a state_dict of tensors")
    return reason[:200]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights into ``model`` strictly, naming the first missing/unexpected/mis-shaped key."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: does not fit the model ({what})")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(own[key].shape)}")
    model.load_state_dict(state)
    return model
