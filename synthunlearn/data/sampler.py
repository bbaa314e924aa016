"""``StatefulSampler``: the order in which a rank draws examples; distributed, deterministic, resumable.

The model of the order is one infinite *global stream*: the concatenation of per-epoch
permutations of ``range(num_examples)``, epoch ``e`` shuffled by a ``torch.Generator`` seeded from
``(seed, e)``. Every micro-step consumes the next ``world_size * micro_batch_size`` positions of
the stream; rank ``r`` takes the ``r``-th contiguous block of ``micro_batch_size`` of them.

Consequences:

- Within an epoch no two ranks (and no two micro-steps) draw the same example; the order depends
  only on the seed, never on timing.
- A final partial global batch is never dropped or padded: it is completed from the next epoch's
  permutation (wrap-around). Every rank therefore takes exactly one micro-batch per step, so all
  ranks stay in lock-step with identical step counts, and every example is seen once per epoch.
  A global batch that straddles two epochs can hold an example twice (once from each epoch);
  with ``num_examples < world_size * micro_batch_size`` one global batch spans several epochs.
- The position is global (``epoch``, ``offset`` into that epoch's permutation), identical on
  every rank. :meth:`state_dict` / :meth:`load_state_dict` restore it exactly, so a resumed run
  draws the same examples it would have drawn. Because positions count examples, not steps,
  resuming with another ``world_size`` at the same global batch size draws the same set of
  examples per optimizer step (distributed differently over ranks).
- :attr:`epoch` is a float: completed epochs plus the consumed fraction of the current one, for
  epoch-based stopping.
"""

from __future__ import annotations

import hashlib

import torch

from synthunlearn.errors import ConfigError


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash rather than seed + epoch so different (seed, epoch) pairs never share an order.
    digest = hashlib.sha256(f"synthunlearn.sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class StatefulSampler:
    """Infinite iterator of this rank's micro-batches (lists of example indices)."""

    def __init__(self, num_examples: int, *, micro_batch_size: int, rank: int, world_size: int,
                 seed: int):
        if num_examples < 1:
            raise ValueError("StatefulSampler: num_examples must be >= 1")
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StatefulSampler: invalid micro_batch_size={micro_batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._epoch = 0   # completed epochs
        self._offset = 0  # positions of the current epoch's permutation already consumed
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        """The global order of ``epoch`` (the same on every rank)."""
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._cache = (epoch, torch.randperm(self.num_examples, generator=gen).tolist())
        return self._cache[1]

    def next_global_batch(self) -> list[int]:
        """The next ``world_size * micro_batch_size`` stream positions (all ranks), advancing."""
        need = self.world_size * self.micro_batch_size
        out: list[int] = []
        while len(out) < need:
            perm = self.permutation(self._epoch)
            take = min(need - len(out), self.num_examples - self._offset)
            out.extend(perm[self._offset:self._offset + take])
            self._offset += take
            if self._offset == self.num_examples:
                self._epoch += 1
                self._offset = 0
        return out

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        batch = self.next_global_batch()
        start = self.rank * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    @property
    def epoch(self) -> float:
        """Epochs consumed so far, fractional (e.g. 1.25 after one and a quarter passes)."""
        return self._epoch + self._offset / self.num_examples

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "offset": self._offset, "num_examples": self.num_examples,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; the data set and seed must be the same."""
        if state.get("num_examples") != self.num_examples or state.get("seed") != self.seed:
            raise ConfigError(
                f"cannot resume the data order: the checkpoint's sampler had num_examples="
                f"{state.get('num_examples')}, seed={state.get('seed')}, this run has "
                f"num_examples={self.num_examples}, seed={self.seed} (data files, max_records, "
                "max_length/packing or optimisation.seed changed)")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.num_examples:
            raise ValueError(f"StatefulSampler: invalid state epoch={epoch} offset={offset}")
        self._epoch, self._offset = epoch, offset
