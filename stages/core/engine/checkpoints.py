"""Checkpoints that let a killed train or finetune stage resume where it was.

They live in ``.checkpoints/<stage>/`` (layout.CHECKPOINTS), which git and DVC ignore and DVC
never deletes, and are removed when the stage has written its outputs. A checkpoint holds what
an uninterrupted run would carry on with (the model, the optimizer, the scheduler, every RNG
state, the early-stopping state and the history) and a fingerprint of the params, the code, the
input files and torch's version: a checkpoint made under any other is never resumed.

Under ``train.parallel: fsdp`` the model and optimizer state are sharded: every rank writes its
shard into ``sharded-<epoch>/`` beside ``checkpoint.pt`` (``torch.distributed.checkpoint``),
and ``checkpoint.pt`` (rank 0's, the rest of the state) names that folder; so under fsdp the
checkpoint folder must be one that every rank reaches (one node, or a shared disk)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stages.core.common.errors import one_line
from stages.core.common.io import write_atomic

CHECKPOINT_FILE = "checkpoint.pt"
SHARDED_PREFIX = "sharded-"


CODE_ROOT = Path(__file__).resolve().parents[1]  # the stages package


def fingerprint(params: Mapping[str, Any], inputs: Iterable[Path | str]) -> str:
    """A digest of ``params`` (but ``checkpoint_every``, which changes no number), every
    ``stages/**/*.py`` file, the ``inputs`` (files or folders) and torch's version: what
    decides the numbers a training run produces."""
    import torch

    digest = hashlib.sha256()
    digest.update(json.dumps(_without_cadence(params), sort_keys=True, default=str).encode())
    digest.update(torch.__version__.encode())
    code = sorted(CODE_ROOT.rglob("*.py"))
    files = [p for path in map(Path, inputs) for p in (sorted(path.rglob("*")) or [path])]
    for path in [*code, *files]:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _without_cadence(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _without_cadence(v) for k, v in tree.items() if k != "checkpoint_every"}
    return tree


class Checkpoints:
    """The checkpoints of one stage's training run.

    ``every``: save every that many epochs (None: never save, never resume). ``main``: this
    process reads, writes and speaks (rank 0); under DDP the others receive its checkpoint from
    fit(), so that nodes without a shared disk resume alike. A resumed stage finds its MLflow
    run by the fingerprint (stages.core.tracking.runs's ``resume_key``): the checkpoint holds no
    run id.
    """

    def __init__(
        self,
        directory: Path | str,
        fingerprint: str,
        every: int | None,
        label: str,
        main: bool = True,
    ):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every = every
        self.label = label
        self.main = main
        self._loaded = False
        self._latest: dict | None = None

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def sharded_folder(self, epoch: int) -> Path:
        """Where every rank writes its shard of the model and optimizer after ``epoch``
        (fsdp); ``checkpoint.pt`` names it as ``sharded``."""
        return self.directory / f"{SHARDED_PREFIX}{epoch}"

    def latest(self) -> dict | None:
        """The checkpoint to resume from, or None: none there, checkpoints off, made under
        another fingerprint (a note), or unreadable (a one-line warning). Read once."""
        if not self._loaded:
            self._loaded = True
            self._latest = self._read() if self.every and self.main else None
            if self._latest is not None:
                self._say(f"resuming from epoch {self._latest['epoch']} ({self.path})")
        return self._latest

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            reason = one_line(exc, 160)
            self._say(f"warning: skipping the unreadable checkpoint {self.path} ({reason})", True)
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            self._say(f"not resuming {self.path}: made with other params, code or data")
            return None
        return state

    def due(self, epoch: int) -> bool:
        """Whether to save after ``epoch``."""
        return bool(self.every) and epoch % self.every == 0

    def save(self, state: Mapping[str, Any]) -> None:
        """Write ``state`` (plus the fingerprint) atomically, on the main process."""
        if not self.main:
            return
        import torch

        full = {**state, "fingerprint": self.fingerprint}
        write_atomic(self.path, lambda tmp: torch.save(full, tmp))
        # The sharded folders that checkpoint.pt no longer names (a kill before the line
        # above left the previous checkpoint.pt and its folder whole).
        for old in self.directory.glob(f"{SHARDED_PREFIX}*"):
            if old.name != state.get("sharded"):
                shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        """Remove this stage's checkpoints (once its outputs are written)."""
        if self.main:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _say(self, message: str, warning: bool = False) -> None:
        if self.main:
            print(
                f"{self.label}: {message}", file=sys.stderr if warning else sys.stdout, flush=True
            )
