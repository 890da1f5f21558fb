"""Training samples as a stateless stream, so runs resume exactly and scale across ranks.

Sample number g of the run (counting over micro-steps and ranks) is a pure function of
(seed, g): its item is position g mod N of the permutation for epoch g div N, and its random
augmentation uses the seed derived from (seed, g). A stream starting at sample S gives micro-step m
the samples [S + m·B·W, S + (m+1)·B·W), of which rank r takes the slice [r·B, (r+1)·B).
Consequences: resuming just starts the stream at the samples consumed so far (with another batch
too); W ranks with batch B see exactly what one process with batch W·B sees; the number of
DataLoader workers changes nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class SampleStream(Sampler):
    """Infinite stream of (item index, sample seed) for one rank, from sample number `start` of the run."""

    def __init__(self, n_items: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if n_items < 1:
            raise ValueError("no training items")
        self.n, self.seed, self.batch = n_items, seed, batch_size
        self.rank, self.world, self.start = rank, world_size, start

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        micro = 0
        epoch, perm = -1, None
        while True:
            first = self.start + micro * self.batch * self.world + self.rank * self.batch
            for g in range(first, first + self.batch):
                if g // self.n != epoch:
                    epoch = g // self.n
                    perm = self._permutation(epoch)
                yield int(perm[g % self.n]), sample_seed(self.seed, g)
            micro += 1


class SampleDataset(Dataset):
    """Wraps items and a pure `sample(item, rng) -> dict of arrays` for (index, seed) keys."""

    def __init__(self, items: Sequence, sample: Callable[[object, np.random.Generator], dict]):
        self.items, self.sample = items, sample

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        return self.sample(self.items[index], np.random.default_rng(seed))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # Ctrl-C and schedulers signal the whole process group: workers leave stopping to the main
    # process, which finishes its step and writes a checkpoint (a dead worker would abort it);
    # they still exit when it does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    dataset: SampleDataset,
    stream: SampleStream,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=stream.batch,
        sampler=stream,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init,
        # a private generator: creating the loader must not consume the global torch RNG,
        # whose state is part of the checkpoint
        generator=torch.Generator().manual_seed(0),
    )


def close(batches: Iterator) -> None:
    """Stop the loader's worker processes now. Workers ignore SIGTERM (see `_worker_init`), so
    if the iterator were left to the interpreter's exit, multiprocessing would send them SIGTERM and
    wait for them forever: a run that failed with an exception would hang instead of exiting."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # the multi-process iterator's own clean stop
    if shutdown is not None:
        shutdown()
