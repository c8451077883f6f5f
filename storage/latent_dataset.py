"""Reading a latent store for training: ``LatentDataset``.

    ds = LatentDataset(url, seed=0, in_memory="auto")
    ds.num_samples, ds.latent_shape, ds.num_classes, ds.latent_scale, ds.latent_shift
    x, y = ds.global_batch(step, batch_size_global, rank, world_size)   # x (B_rank, C, h, w) float32, y (B_rank,)

The order is a pure function of ``(seed, step)``, independent of world size and of where a run resumed:
- the samples are the store's rows with a label >= 0 (rows excluded as bad files carry label -1);
- epoch ``e`` is a permutation of those samples drawn from ``(seed, e)``; it holds
  ``steps_per_epoch = num_samples // batch_size_global`` global batches (the remainder is dropped, so every
  global batch is full and every rank gets the same count);
- global step ``S`` is batch ``b = S % steps_per_epoch`` of epoch ``S // steps_per_epoch``: the slice
  ``perm[b * B : (b + 1) * B]``; rank ``r`` of ``W`` takes its contiguous part ``[r * B / W, (r + 1) * B / W)``;
- the noise and the flip of sample ``i`` in epoch ``e`` come from a counter-based hash of ``(seed, e, i)``
  (SplitMix64 + Box-Muller), so a sample is the same whichever rank or batch it lands in.
So resuming at step ``S`` with any world size yields exactly the batches an uninterrupted run would have seen.

A sample is ``x = (mean[i, f] + std[i, f] * noise - latent_shift) * latent_scale``, ``f`` the flip (0 or 1).

Every shard is checked against its record's checksum when it is first read (all of them at once in memory
mode; in streaming mode the whole shard on its first touch), so no corrupt byte is trained on: a bad shard
raises StoreCorruptError naming the store, the shard and ``dumo verify-store URL --repair``.

It is also a map-style ``torch.utils.data.Dataset`` (``ds[k]`` is the k-th sample of epoch ``ds.epoch`` as
seen by this rank; ``len(ds)`` is that rank's count) and iterable (``for x, y in ds``), for code that wants
a DataLoader; ``set_epoch(e)`` moves both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import zarr

from storage.latent_stream import ShardStream
from storage.latents import StoreError, StoreInfo, parse_records, read_shard, zarr_store

IN_MEMORY_AUTO_BYTES = 2 * 1024**3  # 'auto' loads stores up to this size (mean + std) into memory

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of uint64 that scrambles all bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _epoch_key(seed: int, epoch: int) -> np.uint64:
    with np.errstate(over="ignore"):
        return _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * _GOLDEN + np.uint64(epoch))[0]


def sample_noise(seed: int, epoch: int, indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal noise (len(indices), size) float32 and flips (len(indices),) in {0, 1} for the store
    rows ``indices`` in ``epoch``: a pure function of (seed, epoch, index)."""
    key = _epoch_key(seed, epoch)
    pairs = (size + 1) // 2
    stride = np.uint64(pairs + 1)  # counters [i * stride, i * stride + pairs]: pairs normals, then one flip
    with np.errstate(over="ignore"):
        base = indices.astype(np.uint64)[:, None] * stride + key
        bits = _mix64((base + np.arange(pairs + 1, dtype=np.uint64)) * _GOLDEN)
    flips = (bits[:, -1] >> np.uint64(63)).astype(np.int64)
    # Box-Muller on two 24-bit uniforms per 64-bit word, in float32 (twice as fast as float64; tails reach
    # 5.8 sigma); u1 in (0, 1] keeps the log finite
    words = bits[:, :-1]
    u1 = ((words >> np.uint64(40)).astype(np.float32) + 1.0) * np.float32(2.0**-24)
    u2 = (words & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * np.pi) * u2
    noise = np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)[:, :size]
    return noise, flips


class LatentDataset(torch.utils.data.Dataset):
    """Samples of a complete latent store (see the module docstring for the order and the sample formula).

    Args:
        url: the store (any URL storage.fs understands).
        rank, world_size: the defaults for ``__iter__``/``__getitem__``/``batches``; ``global_batch`` takes
            its own.
        seed: the seed of every permutation, noise and flip.
        in_memory: True loads mean, std and labels into memory (fast random access); False streams whole
            shards through a node-local cache (storage.latent_stream), fetching those of the next
            ``prefetch_steps`` global batches in the background; "auto" loads stores up to IN_MEMORY_AUTO_BYTES.
        flip: False always uses the original (axis 1 = 0), for evaluation.
        cache_dir: the streaming cache (default: $DUMO_CACHE_DIR/<store id>, else under the temp dir).
        stream: False reads each batch's rows from the store with zarr instead (no local disk used; slow:
            one read per inner chunk, see storage/latent_stream.py).
    """

    def __init__(
        self,
        url: str,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        in_memory: bool | Literal["auto"] = "auto",
        flip: bool = True,
        cache_dir: str | None = None,
        prefetch_steps: int = 4,
        stream: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        group = zarr.open_group(zarr_store(url, read_only=True), mode="r", zarr_format=3)
        self.info = StoreInfo(url=url, attrs=dict(group.attrs))
        if not self.info.complete:
            raise StoreError(f"latent store {url} is not complete (finalize has not passed); refusing to train on it")
        self.url, self.rank, self.world_size, self.seed, self.flip = url, rank, world_size, seed, flip
        self.epoch = 0
        self.latent_scale = float(self.info.attrs["latent_scale"])
        self.latent_shift = float(self.info.attrs["latent_shift"])
        self.num_classes = len(self.info.class_names)
        self.latent_shape: tuple[int, int, int] = self.info.latent_shape
        self._group, self._records = group, parse_records(group["shard_records"][:])
        self._verified: set[int] = set()  # shards whose checksum has been checked in this process
        nbytes = 2 * group["mean"].nbytes
        self.in_memory = bool(in_memory) if in_memory != "auto" else nbytes <= IN_MEMORY_AUTO_BYTES
        if self.in_memory:  # read shard by shard, each checked against its record
            self._mean = np.empty(group["mean"].shape, group["mean"].dtype)
            self._std = np.empty_like(self._mean)
            labels = np.empty(group["label"].shape, np.int32)
            for index in range(self.info.num_shards):
                start, stop = self.info.shard_rows(index)
                self._mean[start:stop], self._std[start:stop], labels[start:stop] = self._checked(index)
        else:
            self._mean, self._std, labels = group["mean"], group["std"], group["label"][:]
        self._rows = np.flatnonzero(labels >= 0)  # usable store rows, in store order
        self._perm: tuple[int, np.ndarray] = (-1, self._rows)
        self._labels = labels.astype(np.int64)
        self.prefetch_steps = prefetch_steps
        # the stream checks each shard's checksum when it first reads it (once per node)
        self.stream = (
            ShardStream(url, self.info, cache_dir, records=self._records) if stream and not self.in_memory else None
        )

    def _checked(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = read_shard(self._group, self.info, index, self._records[index])
        self._verified.add(index)
        return out

    @property
    def num_samples(self) -> int:
        return len(self._rows)

    def steps_per_epoch(self, batch_size_global: int) -> int:
        steps = self.num_samples // batch_size_global
        if steps < 1:
            raise ValueError(f"global batch {batch_size_global} > {self.num_samples} samples in the store")
        return steps

    def permutation(self, epoch: int) -> np.ndarray:
        """Store rows in the order of ``epoch``."""
        if self._perm[0] != epoch:  # one epoch is asked for many times in a row: keep the last
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm = (epoch, self._rows[rng.permutation(self.num_samples)])
        return self._perm[1]

    def samples(self, rows: np.ndarray, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples of store ``rows`` in ``epoch``: x (B, C, h, w) float32, y (B,) int64."""
        c, h, w = self.latent_shape
        noise, flips = sample_noise(self.seed, epoch, rows, c * h * w)
        if not self.flip:
            flips[:] = 0
        if self.in_memory:
            mean, std = self._mean[rows, flips], self._std[rows, flips]
        elif self.stream is not None:
            mean, std = self.stream.gather(rows, flips)
        else:  # zarr reads sorted rows fastest (both flips come along); undo the sort afterwards
            for index in np.unique(rows // self.info.shard_size).tolist():
                if index not in self._verified:  # first touch: the whole shard is read once and checked
                    self._checked(index)
            order = np.argsort(rows, kind="stable")
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            picked = np.arange(len(rows)), flips
            mean = self._mean.oindex[rows[order]][inverse][picked]
            std = self._std.oindex[rows[order]][inverse][picked]
        x = mean.astype(np.float32) + std.astype(np.float32) * noise.reshape(len(rows), c, h, w)
        if self.latent_shift:
            x -= self.latent_shift
        if self.latent_scale != 1.0:
            x *= self.latent_scale
        return torch.from_numpy(x), torch.from_numpy(self._labels[rows])

    def global_batch(
        self, step: int, batch_size_global: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of global batch ``step``: x (B_rank, C, h, w) float32, y (B_rank,) int64, with
        ``B_rank = batch_size_global / world_size``."""
        if batch_size_global % world_size:
            raise ValueError(f"global batch {batch_size_global} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        steps = self.steps_per_epoch(batch_size_global)
        epoch, b = divmod(step, steps)
        per_rank = batch_size_global // world_size
        lo = b * batch_size_global + rank * per_rank
        perm = self.permutation(epoch)
        if self.stream is not None:  # this rank's rows of the next steps of this epoch, fetched meanwhile
            ahead = [
                perm[lo + k * batch_size_global : lo + k * batch_size_global + per_rank]
                for k in range(1, 1 + self.prefetch_steps)
                if b + k < steps
            ]
            if ahead:
                self.stream.prefetch(np.concatenate(ahead))
        return self.samples(perm[lo : lo + per_rank], epoch)

    def batches(self, batch_size_global: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This dataset's rank's batches from global step ``start_step`` on, forever (epochs roll over)."""
        step = start_step
        while True:
            yield self.global_batch(step, batch_size_global, self.rank, self.world_size)
            step += 1

    # torch.utils.data interface: one epoch, this rank's contiguous part of the permutation.
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_rows(self) -> np.ndarray:
        per_rank = self.num_samples // self.world_size
        return self.permutation(self.epoch)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.samples(self._rank_rows()[k : k + 1], self.epoch)
        return x[0], y[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self._rank_rows()
        for lo in range(0, len(rows), 1024):
            x, y = self.samples(rows[lo : lo + 1024], self.epoch)
            yield from zip(x, y)
