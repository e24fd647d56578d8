"""What the table runners share: a ledger of finished jobs, ``python cli.py`` jobs and their results, and the
mean ± std cells of the tables."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class Ledger:
    """The records of finished jobs in a JSON file ``{"records": [...]}``, one record per job key.

    Every merge re-reads the file under a lock (``<name>.lock`` beside it) and replaces it atomically, so two
    sweeps may share a ledger and a sweep cut off at any point keeps every job it finished. A sweep claims each
    job before it starts it (``<name>.claims.json``), so two sweeps on one ledger never run the same job.

    ``is_current`` tells a record that still counts from a stale one, whose job is run again; ``owner`` (host,
    pid) identifies the claiming process, by default this one.
    """

    def __init__(self, path: Path, key: Callable[[dict], str], is_current: Callable[[dict], bool] = lambda _: True,
                 owner: tuple[str, int] | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.is_current = is_current
        self.owner = list(owner) if owner else [socket.gethostname(), os.getpid()]
        self.claims_path = self.path.with_suffix(".claims.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def merge(self, new: Iterable[dict] = ()) -> list[dict]:
        """Adds ``new`` (replacing the records of the same jobs, and ending their claims) and returns all records."""
        new = list(new)
        with self._locked():
            records = self._read()
            replaced = {self.key(record) for record in new}
            records = [record for record in records if self.key(record) not in replaced] + new
            if new:
                _write_json(self.path, {"records": records})
                self._end_claims(replaced)
        return records

    def claim(self, key: str) -> list[dict] | None:
        """Claims job ``key`` for this process unless the ledger holds it or another live process has claimed it.
        Returns all records (with what other sweeps finished meanwhile), or None where the job is not this
        process's to run. The claim ends when the job's record is merged or ``release`` is called. A claim of a
        process that is gone is void; one from another host counts as live (its process cannot be checked from
        here): remove ``<name>.claims.json`` if that sweep died."""
        with self._locked():
            records = self._read()
            if any(self.key(record) == key and self.is_current(record) for record in records):
                return None
            claims = self._claims()
            holder = claims.get(key)
            if holder is not None and holder != self.owner and _alive(holder):
                return None
            claims[key] = self.owner
            _write_json(self.claims_path, claims)
            return records

    def release(self, key: str) -> None:
        """Ends this process's claim of a job that did not finish (so a later sweep may run it)."""
        with self._locked():
            self._end_claims({key})

    def _claims(self) -> dict[str, list]:
        if not self.claims_path.is_file():
            return {}
        try:
            claims = json.loads(self.claims_path.read_text())
            if not all(isinstance(owner, list) and len(owner) == 2 for owner in claims.values()):
                raise TypeError("an owner is not [host, pid]")
        except (json.JSONDecodeError, AttributeError, TypeError) as error:
            raise SystemExit(f"job claims {self.claims_path} are unreadable ({error!r}); expected {{job key: [host, "
                             f"pid]}}. It lists only the jobs running now: delete it once no sweep on "
                             f"{self.path} runs") from error
        return claims

    def _end_claims(self, keys: set[str]) -> None:
        claims = self._claims()
        if any(claims.get(key) == self.owner for key in keys):
            _write_json(self.claims_path, {k: v for k, v in claims.items() if not (k in keys and v == self.owner)})

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            records = json.loads(self.path.read_text())["records"]
            for record in records:
                self.key(record)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SystemExit(f"ledger {self.path} is not a ledger of this runner ({error!r}); expected "
                             f'{{"records": [...]}} with the fields of its job keys: fix or move it, nothing '
                             f"was written") from error
        return records


def _write_json(path: Path, value) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(partial, path)


def _alive(owner: list) -> bool:
    """Whether the process (host, pid) that claimed a job still runs; one on another host is assumed to."""
    host, pid = owner
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)  # PermissionError: another user's live process
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@dataclass(frozen=True)
class CliRun:
    """A finished ``python cli.py`` job: its test metrics (``test/`` removed), run folder and cost."""

    metrics: dict[str, float]
    run_dir: Path
    wall_seconds: float
    cpu_seconds: float  # user + system time of the job's process and the processes it waited for
    command: str

    def cost(self) -> dict:
        return {"seconds": round(self.wall_seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "run_dir": str(self.run_dir), "command": self.command}


def run_cli(subcommand: str, arguments: list[str], run_root: Path, env: dict[str, str] | None = None) -> CliRun:
    """``python cli.py <subcommand> <arguments>`` in a fresh process (sweep jobs stay independent); its output
    is appended to ``<run_root>/cli.log``. Returns the metrics of the ``results.json`` the job wrote under
    ``run_root`` (a ``test``, or a ``fit`` with ``--run.test_after_fit true``)."""
    run_root = Path(run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "cli.py", subcommand, *arguments]
    log = run_root / "cli.log"
    started_at = time.time()
    started = time.perf_counter()
    with open(log, "a") as output:
        output.write(f"$ {' '.join(command[1:])}\n")
        output.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "WANDB_MODE": "offline", **(env or {})})
        try:
            # wait4 gives this child's own resource use, exact even while other jobs run beside it.
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    wall_seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"cli.py {subcommand} failed (exit {process.returncode}): {' '.join(command[1:])}\n"
                           f"last lines of {log}:\n{tail}")
    fresh = [path for path in run_root.rglob("results.json") if path.stat().st_mtime >= started_at - 1]
    if not fresh:
        raise RuntimeError(f"cli.py {subcommand} wrote no results.json under {run_root}: {' '.join(command[1:])}")
    results = max(fresh, key=lambda path: path.stat().st_mtime)
    return CliRun(test_metrics(json.loads(results.read_text())["metrics"]), results.parent, wall_seconds,
                  usage.ru_utime + usage.ru_stime, " ".join(command[1:]))


def test_metrics(logged: dict[str, float]) -> dict[str, float]:
    """Test metrics by ``<domain>/<metric>`` (``target/image_auroc``): the logged keys without ``test/``."""
    return {name.removeprefix("test/"): value for name, value in logged.items()}


def tested_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the run's test scored (a fit's selected one; its last.ckpt where a fit that monitors
    nothing tested the weights it ended with), if it is still on disk."""
    results = Path(run_dir) / "results.json"
    if not results.is_file():
        return None
    checkpoint = Path(json.loads(results.read_text()).get("checkpoint") or Path(run_dir) / "checkpoints" / "last.ckpt")
    return checkpoint if checkpoint.is_file() else None


def relabelled_checkpoint(checkpoint: Path, destination: Path, **hyper_parameters) -> Path:
    """A copy of ``checkpoint`` with some model hyperparameters changed and no optimizer state (``cli.py test``
    builds the model from the checkpoint's hyperparameters, e.g. a source-only fit tested as ``mode: adabn``)."""
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    state["hyper_parameters"].update(hyper_parameters)
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in state.items() if k not in ("optimizer_states", "lr_schedulers")}, destination)
    return destination


def mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std (n=N)`` of ``values × scale`` (sample std); ``—`` when there are none."""
    if not values:
        return "—"
    scaled = [scale * v for v in values]
    if len(scaled) == 1:
        return f"{scaled[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(scaled):.{digits}f} ± {statistics.stdev(scaled):.{digits}f} (n={len(scaled)})"


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]
