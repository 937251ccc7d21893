"""Batches by token budget, as fairseq's ``--max-tokens``: sentence pairs of similar length
grouped so that a padded batch holds at most ``max_tokens`` tokens on its longer side."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Length-grouped batches of at most ``max_tokens`` padded tokens each.

    The examples are put in a seeded random order, stably sorted by length (ties stay shuffled)
    and cut greedily into batches with ``batch size * longest length <= max_tokens``. The batches
    are fixed; each epoch visits them in a new order (``set_epoch``, called by the Trainer; under
    ``accelerate`` every process takes its share of the batches).

    Args:
        lengths: the length of each example, the longer of its source and target sides.
        max_tokens: the token budget of one batch.
        shuffle: visit the batches in a new random order every epoch.
        seed: seed of the tie order and of the epoch orders.
    """

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if len(lengths) == 0:
            raise ValueError("TokenBudgetBatchSampler needs at least one example")
        too_long = [length for length in lengths if length > max_tokens]
        if too_long:
            raise ValueError(
                f"{len(too_long)} examples are longer than max_tokens={max_tokens} (the longest "
                f"has {max(too_long)} tokens): raise max_tokens or lower the maximum lengths"
            )
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        generator = torch.Generator().manual_seed(seed)
        shuffled = torch.randperm(len(lengths), generator=generator).tolist()
        self.batches = self._cut(sorted(shuffled, key=lambda index: lengths[index]), lengths)

    def _cut(self, order: list[int], lengths: Sequence[int]) -> list[list[int]]:
        batches, batch, longest = [], [], 0
        for index in order:
            candidate = max(longest, lengths[index])
            if batch and (len(batch) + 1) * candidate > self.max_tokens:
                batches.append(batch)
                batch, candidate = [], lengths[index]
            batch.append(index)
            longest = candidate
        batches.append(batch)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            yield from self.batches
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for position in torch.randperm(len(self.batches), generator=generator).tolist():
            yield self.batches[position]

    def __len__(self) -> int:
        return len(self.batches)
