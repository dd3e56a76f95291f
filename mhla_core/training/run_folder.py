"""A run folder is owned by one run: refused when it holds another (unless --resume / --overwrite), locked
while the run lives, with `config.yaml`, `log.jsonl`, `run.json` (the tracker's run id) and `checkpoints/`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

RUN_FILES = ("config.yaml", "log.jsonl", "run.json", "last", "checkpoints")


def holds_run(out: Path) -> bool:
    """Whether `out` holds (part of) a training run."""
    return any((out / name).exists() or (out / name).is_symlink() for name in RUN_FILES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`{out}/.lock` (pid and host) held for the life of a run. A lock whose process is gone is taken over, and
    so is one of this very process (a run in it that raised: one process trains one run at a time)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                pid = other.get("pid")
                if other.get("host") == me["host"] and isinstance(pid, int) and (pid == me["pid"] or not _alive(pid)):
                    self.path.unlink(missing_ok=True)  # stale: that run is over
                    continue
                raise FileExistsError(f"--output {out} is in use by another run ({other or 'unreadable lock'}); "
                                      f"wait for it, or remove {self.path} if that run is dead") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise FileExistsError(f"could not lock --output {out}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def claim_run_folder(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create/lock `out` for this run. A folder holding a run needs --resume (continue it) or --overwrite
    (its run files are deleted first); anything else is refused, so no run is silently replaced."""
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        if holds_run(out) and not resume:
            if not overwrite:
                raise FileExistsError(f"--output {out} already holds a run; pass --resume to continue it, "
                                      "--overwrite to replace it, or choose another --output")
            for name in RUN_FILES:
                p = out / name
                if p.is_symlink() or p.is_file():
                    p.unlink()
                elif p.is_dir():
                    shutil.rmtree(p)
    except BaseException:
        lock.release()
        raise
    return lock


def run_id(out: Path, resume: bool) -> str:
    """The tracker run id of this run folder: stored in `run.json`, reused on --resume."""
    path = out / "run.json"
    info: dict[str, Any] = json.loads(path.read_text()) if resume and path.is_file() else {}
    if "id" not in info:
        info["id"] = uuid.uuid4().hex[:12]
        path.write_text(json.dumps(info))
    return info["id"]


def open_log(out: Path, resume_step: int | None):
    """`log.jsonl` for appending; on resume the records after the checkpoint's step (replayed) are dropped."""
    path = out / "log.jsonl"
    if resume_step is not None and path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in keep))
    return open(path, "a" if resume_step is not None else "w")
