"""What ``fit()`` draws its batches from: feature tensors, or token ids padded per batch.

A batch source answers, for a batch's row indices, the model's inputs and the targets. The loop
knows nothing else about it, so one loop trains the feature classifiers (a tensor per batch)
and the text models (a dict of ``input_ids`` and ``attention_mask`` per batch).

- ``TensorBatches``: rows of a feature tensor, indexed on the device as the loop always did.
- ``TokenBatches``: texts tokenized once per stage run (not per epoch) into a matrix of ids; a
  batch is padded only to its own longest text (to a multiple of 8 on CUDA, where tensor cores
  want it), and the shuffle groups texts of similar length so that little padding remains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

# Length grouping sorts the shuffled rows in windows of this many batches (as HF's
# LengthGroupedSampler's megabatches do): enough to find similar lengths, still random.
GROUP_BATCHES = 50


@dataclass(frozen=True)
class TensorBatches:
    """Feature rows ``x`` and class indices ``y``: a batch is ``x[idx]``."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device) -> TensorBatches:
        return TensorBatches(self.x.to(device), self.y.to(device))

    def order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """One epoch's row order: a seeded permutation (the loop's order since the seed)."""
        return torch.randperm(len(self.x), generator=generator)

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]


@dataclass(frozen=True)
class TokenBatches:
    """Tokenized texts: ``ids`` (rows x width, right-padded with ``pad_id``), each row's token
    count in ``lengths`` and its class index in ``y``."""

    ids: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor
    pad_id: int
    pad_multiple: int = 1

    @classmethod
    def from_ids(
        cls, rows: Sequence[Sequence[int]], y: Sequence[int] | torch.Tensor, pad_id: int
    ) -> TokenBatches:
        """From one list of token ids per text (already truncated)."""
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
        # A multiple of 8 wide, so that a CUDA batch rounded up to 8 never runs off the end.
        longest = int(lengths.max()) if len(rows) else 1
        width = max(8, -(-longest // 8) * 8)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        return cls(ids, lengths, torch.as_tensor(y, dtype=torch.long), pad_id)

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device) -> TokenBatches:
        multiple = 8 if device.type == "cuda" else 1
        return replace(
            self,
            ids=self.ids.to(device),
            lengths=self.lengths.to(device),
            y=self.y.to(device),
            pad_multiple=multiple,
        )

    def order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """One epoch's row order, seeded: a permutation sorted by length (longest first) within
        windows of ``GROUP_BATCHES`` batches, then its full batches shuffled (the last, partial
        one stays last so that every batch of the loop is one of these)."""
        n = len(self.ids)
        order = torch.randperm(n, generator=generator)
        lengths = self.lengths.cpu()[order]
        window = batch_size * GROUP_BATCHES
        for start in range(0, n, window):
            part = slice(start, start + window)
            ranked = torch.sort(lengths[part], descending=True, stable=True).indices
            order[part] = order[part][ranked]
        full = n // batch_size
        batches = order[: full * batch_size].view(full, batch_size)
        shuffled = batches[torch.randperm(full, generator=generator)].reshape(-1)
        return torch.cat([shuffled, order[full * batch_size :]])

    def eval_order(self) -> torch.Tensor:
        """Rows longest first: evaluation batches then pad least."""
        return torch.sort(self.lengths.cpu(), descending=True, stable=True).indices

    def inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of these rows, padded to the longest of them."""
        lengths = self.lengths[idx]
        width = int(lengths.max())
        width = -(-width // self.pad_multiple) * self.pad_multiple
        positions = torch.arange(width, device=self.ids.device)
        return {
            "input_ids": self.ids[idx, :width],
            "attention_mask": (positions < lengths[:, None]).long(),
        }

    def padded_tokens(self, batch_size: int, generator: torch.Generator | None = None) -> int:
        """Token slots (real + padding) one epoch's batches hold: what padding costs."""
        order = self.order(generator or torch.Generator().manual_seed(0), batch_size)
        lengths = self.lengths.cpu()[order]
        return sum(int(chunk.max()) * len(chunk) for chunk in lengths.split(batch_size))
