"""The training sampler: length grouping (method.group_by_length) seeded per epoch, so a resumed run sees the same batches.

transformers (5.24) builds its LengthGroupedSampler without a generator: each epoch's order comes from torch's
global RNG, whose state after a resume differs from the uninterrupted run's (the model, dropout and the skipped
steps have drawn from it differently), so from the second epoch on a resumed run trained on other batches.
Here the order of epoch e comes from a generator seeded with `data_seed + e` (or `seed + e`): it depends on the
seed and the epoch alone. The Trainer calls `set_epoch(epoch)` on the train dataloader before each epoch (also for
the epoch a resume starts in, whose first batches it then skips), and accelerate's DataLoaderShard passes it on to
the sampler (through its batch sampler, a BatchSamplerShard with several ranks, or a SkipBatchSampler), so every
epoch, and every rank, draws the same order whether or not the run was interrupted. Random and sequential
sampling are already reproducible (accelerate seeds its random sampler per epoch) and are left as they are.
"""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping (shuffle, group into mega-batches, sort each by length) with the order of epoch e
    drawn from a generator seeded with `seed + e`."""

    def __init__(self, batch_size: int, seed: int, dataset=None, lengths: list[int] | None = None, model_input_name: str | None = None):
        super().__init__(batch_size, dataset=dataset, lengths=lengths, model_input_name=model_input_name)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class SeededSampling:
    """Trainer mixin: the length-grouped train sampler transformers builds, seeded per epoch (see the module docstring)."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # transformers' own (lengths already read from the data): seed it
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size, seed, lengths=sampler.lengths)
        return sampler


_SEEDED: dict[type, type] = {}


def seeded(trainer_cls: type) -> type:
    """`trainer_cls` with SeededSampling (itself when it has it already: medgpt.stages.preference.PreferenceTrainer)."""
    if issubclass(trainer_cls, SeededSampling):
        return trainer_cls
    if trainer_cls not in _SEEDED:
        _SEEDED[trainer_cls] = type(trainer_cls.__name__, (SeededSampling, trainer_cls), {"__module__": __name__,
                                                                                          "__doc__": trainer_cls.__doc__})
    return _SEEDED[trainer_cls]
