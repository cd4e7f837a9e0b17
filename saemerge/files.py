"""Writes that a kill cannot leave half done: a complete file or folder is renamed over the old one."""

from __future__ import annotations

import ctypes
import json
import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import RecipeError, UserError

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # flags of Linux's renameat2


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a hidden file beside `path`, then rename it over `path`: whoever reads `path` (or kills
    the writer) finds the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _renameat2(src: Path, dst: Path, flag: int) -> bool:
    """Linux's renameat2(src, dst, flag); False where the C library or the filesystem does not have it."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if rename is None:
        return False
    at_cwd = -100  # AT_FDCWD: relative paths are relative to the current directory
    if rename(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def move_into_place(folder: Path, output: Path, overwrite: bool) -> None:
    """Rename the complete `folder` to `output`, so that at every instant `output` is absent, the old folder or
    the new one. An existing output is replaced only with `overwrite`: swapped with the new one in one atomic
    step (Linux), else renamed aside to a hidden name first; then deleted."""
    if not output.exists():
        if not _renameat2(folder, output, RENAME_NOREPLACE):  # NOREPLACE: never over a folder made meanwhile
            folder.rename(output)
        return
    if not overwrite:  # validate checked this before training; another process may have written it since
        raise RecipeError(f"output: '{output}' appeared while merging; expected a new folder (or pass --overwrite)")
    if _renameat2(folder, output, RENAME_EXCHANGE):
        old = folder  # the old output now sits at the temporary name
    else:
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)  # a kill right here leaves the old folder complete at this hidden name
        try:
            folder.rename(output)
        except BaseException:
            old.rename(output)
            raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def new_folder(output: Path, overwrite: bool):
    """Yield a hidden folder beside `output` to write into; renamed into place when the block ends, removed if
    it raises: `output` is never half written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(output: str | Path | None, overwrite: bool) -> None:
    """One line, before any work is done, if `output` exists and may not be replaced."""
    if output is not None and Path(output).exists() and not overwrite:
        raise UserError(f"--output: '{output}' exists; expected a new folder (or pass --overwrite)")


def write_results(output: str | Path, overwrite: bool, name: str, report: dict, markdown: str, plot,
                  **more_json) -> None:
    """An analysis's folder, atomically: name.json (the report), name.md, name.png (`plot(report, path)`) and
    every `more_json` as its own file."""
    with new_folder(Path(output), overwrite) as tmp:
        for stem, content in {name: report, **more_json}.items():
            (tmp / f"{stem}.json").write_text(json.dumps(content, indent=1))
        (tmp / f"{name}.md").write_text(markdown)
        plot(report, tmp / f"{name}.png")


def inside(root: Path, *parts: str) -> Path:
    """root/parts, or a RecipeError if that resolves outside root: names from a recipe or a model never write
    elsewhere."""
    path = Path(root, *parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise RecipeError(f"'{Path(*parts)}' would be written outside '{root}'; expected a path inside it")
    return path
