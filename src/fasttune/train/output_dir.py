"""What a training run may do to its output_dir, checked before it writes anything.

- A fresh run never replaces an earlier run's files (run.yaml, adapter/, metrics, loss.png,
  checkpoints/) unless `overwrite` is set; `resume` continues the run that is there. Other files in the
  directory are left alone either way.
- The checks run twice: once before anything loads (cheap, writes nothing, so a mistake is reported
  at once), and again under the run's lock, right before the first write.
- `claim` takes the lock (run_lock.py) and, with `overwrite`, removes the earlier run's files.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fasttune.config import TrainConfig
from fasttune.run_dir import RunDir, RunDirError
from fasttune.run_lock import RunLock


def check(cfg: TrainConfig) -> RunDir:
    """Refuse an output_dir the run cannot use as asked; touches nothing."""
    run = RunDir(cfg.output_dir)
    for parent in (run.root, *run.root.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"output_dir {run.root}: {parent} is a file, not a directory")
            break
    if cfg.resume or cfg.overwrite:
        return run
    earlier = run.run_files()
    if earlier:
        what = "a finished run" if run.is_finished() else "an earlier run"
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in earlier)
        raise RunDirError(f"output_dir {run.root} holds {what} ({names}); continue it with --resume, replace "
                          "it with --overwrite, or choose another output_dir")
    return run


@contextmanager
def claim(cfg: TrainConfig, log: Callable[[str], None]) -> Iterator[RunDir]:
    """Hold output_dir for the block: make it, lock it, check again, and with `overwrite` clear the earlier
    run's files. The lock is released when the block ends, however it ends."""
    run = check(cfg)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(run.root)) from None
    with RunLock(run.lock, log):
        check(cfg)  # another run may have finished here since the first check
        if cfg.overwrite and not cfg.resume:
            remove_earlier_run(run, log, "  overwrite")
        yield run


def remove_earlier_run(run: RunDir, log: Callable[[str], None], why: str) -> None:
    """Remove the files an earlier run wrote in `run` (`RunDir.run_files`), each named in the log."""
    for path in run.run_files():
        log(f"{why}: removing the earlier run's {path}")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
