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


IGNORE_INDEX = -100  # a target position no loss is taken at (cross_entropy's ignore_index)


@dataclass(frozen=True)
class BlockBatches:
    """Blocks of token ids for language-model pretraining, each with targets per token.

    ``ids`` (blocks x block size, right-padded with ``pad_id``) and each block's token count in
    ``lengths``. ``objective`` ``clm``: a token's target is the next token (the shift is done
    here, so the loop takes the loss at every position as it is); ``mlm``: about
    ``mlm_probability`` of the tokens that are neither special nor padding are chosen, 80% of
    them become ``mask_id``, 10% a random token id below ``vocab_size``, 10% stay, and only the
    chosen ones are targets (BERT's rule, as HF's ``DataCollatorForLanguageModeling`` draws
    it). The draws come from the generator the loop passes (its seeded, checkpointed shuffle
    generator), so a resumed run masks exactly as an uninterrupted one.

    ``token_targets`` tells the loop that targets are per token (``IGNORE_INDEX`` elsewhere):
    it draws a step's batch through ``labelled`` and averages the loss over target tokens.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    objective: str  # mlm | clm
    pad_id: int
    mask_id: int | None = None
    vocab_size: int = 0
    special_ids: tuple[int, ...] = ()
    mlm_probability: float = 0.15

    token_targets = True  # a class attribute: not a field

    @classmethod
    def from_blocks(cls, blocks: Sequence[Sequence[int]], pad_id: int, **options) -> BlockBatches:
        """From one list of token ids per block (each at most the block size)."""
        lengths = torch.tensor([len(block) for block in blocks], dtype=torch.long)
        width = int(lengths.max()) if len(blocks) else 1
        ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
        for i, block in enumerate(blocks):
            ids[i, : len(block)] = torch.as_tensor(block, dtype=torch.long)
        return cls(ids, lengths, pad_id=pad_id, **options)

    @property
    def targets(self) -> torch.Tensor:
        return self.ids  # the loop reads the device from here

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device) -> BlockBatches:
        return replace(self, ids=self.ids.to(device), lengths=self.lengths.to(device))

    def order(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """One epoch's block order: a seeded permutation."""
        return torch.randperm(len(self.ids), generator=generator)

    def eval_order(self) -> torch.Tensor:
        return torch.arange(len(self.ids))

    def inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of these blocks, padded to the longest."""
        lengths = self.lengths[idx]
        width = int(lengths.max())
        positions = torch.arange(width, device=self.ids.device)
        return {
            "input_ids": self.ids[idx, :width],
            "attention_mask": (positions < lengths[:, None]).long(),
        }

    def labelled(
        self, idx: torch.Tensor, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model's inputs for these blocks and the target of each position
        (``IGNORE_INDEX`` where none). MLM draws its masks from ``generator`` (on the CPU)."""
        inputs = self.inputs(idx)
        ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
        if self.objective == "clm":
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[:, :-1] = torch.where(real[:, 1:], ids[:, 1:], IGNORE_INDEX)
            return inputs, labels
        if self.objective != "mlm":
            raise ValueError(f"unknown objective {self.objective!r} (mlm or clm)")
        shape = tuple(ids.shape)
        chosen = torch.rand(shape, generator=generator) < self.mlm_probability
        masked = torch.rand(shape, generator=generator) < 0.8
        randomised = torch.rand(shape, generator=generator) < 0.5
        words = torch.randint(self.vocab_size, shape, generator=generator)
        device = ids.device
        chosen, masked, randomised = chosen.to(device), masked.to(device), randomised.to(device)
        candidates = real.clone()
        for special in self.special_ids:
            candidates &= ids != special
        chosen &= candidates
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        corrupted = torch.where(chosen & masked, self.mask_id, ids)
        corrupted = torch.where(chosen & ~masked & randomised, words.to(device), corrupted)
        return {**inputs, "input_ids": corrupted}, labels

    def tokens(self) -> int:
        """Real (not padding) tokens the blocks hold."""
        return int(self.lengths.sum())
