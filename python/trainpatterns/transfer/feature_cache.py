"""Cached bottleneck features: run a frozen backbone once and train a head on its stored outputs,
in memory or as an ``np.memmap`` on disk (``meta.json`` written last marks a complete cache).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn


_META = "meta.json"


class FeatureCache:
    """Run a frozen ``backbone`` once over ``inputs`` and keep the outputs (the bottleneck
    features), so a head trains on them without a backbone forward per epoch.

    ``inputs``: a tensor or numpy array (``np.memmap`` included) with one example per row; it is
    fed to the backbone ``batch_size`` rows at a time, on ``device`` (default: the backbone's).
    ``targets`` (optional, same first dimension) is kept beside the features. Features are stored
    with ``dtype`` (default: the backbone's output dtype) in memory, or, with ``directory``, in
    ``directory/features.npy`` as an ``np.memmap`` (for data larger than memory; reopen with
    :meth:`load`). ``meta.json`` is written last, so a cache interrupted while being built is never
    loaded.

    The backbone runs in eval mode under ``torch.no_grad()`` and must be frozen (no parameter with
    ``requires_grad``): features of a training backbone would go stale. Random data augmentation
    cannot be cached: cache the un-augmented inputs, or augment in feature space.
    """

    def __init__(self, backbone: nn.Module, inputs: Any, targets: Any = None, *, batch_size: int = 256,
                 directory: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
        trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the backbone has {len(trainable)} trainable parameter(s) (e.g. {trainable[0]!r}): "
                             f"freeze it first (trainpatterns.transfer.freeze(backbone)), cached features "
                             f"would go stale")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        x = _as_rows(inputs, "inputs")
        n = x.shape[0]
        if targets is not None:
            targets = _as_rows(targets, "targets")
            if targets.shape[0] != n:
                raise ValueError(f"targets has {targets.shape[0]} rows but inputs has {n}")
        if n == 0:
            raise ValueError("inputs is empty: nothing to cache")
        self.directory = None if directory is None else os.fspath(directory)
        if self.directory is not None:
            if os.path.exists(os.path.join(self.directory, _META)) and not overwrite:
                raise FileExistsError(f"{self.directory} already holds a feature cache: FeatureCache.load() it, "
                                      f"or pass overwrite=True")
            os.makedirs(self.directory, exist_ok=True)
            meta = os.path.join(self.directory, _META)
            if os.path.exists(meta):
                os.remove(meta)  # invalidate the old cache before overwriting its arrays
        if device is None:
            ref = next(backbone.parameters(), None)
            device = ref.device if ref is not None else torch.device("cpu")
        was_training = backbone.training
        backbone.eval()
        store = None
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    rows = x[start:start + batch_size]
                    xb = (torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows).to(device)
                    out = backbone(xb)
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"the backbone must return one tensor, got {type(out).__name__}")
                    if out.shape[0] != xb.shape[0]:
                        raise ValueError(f"the backbone returned {out.shape[0]} rows for a batch of {xb.shape[0]}")
                    if store is None:
                        store = self._allocate(n, tuple(out.shape[1:]), dtype or out.dtype)
                    store[start:start + out.shape[0]] = _to_store(out.detach().cpu().to(dtype or out.dtype), store)
        finally:
            backbone.train(was_training)
        if self.directory is not None:
            store.flush()
            if targets is not None:
                np.save(os.path.join(self.directory, "targets.npy"), _to_numpy(targets))
            self._write_meta(n, store, targets is not None)
            self._features = torch.from_numpy(store)
            self._targets = None if targets is None else _readonly_tensor(
                np.load(os.path.join(self.directory, "targets.npy"), mmap_mode="r"))
        else:
            self._features = store
            self._targets = None if targets is None else torch.as_tensor(targets)

    def _allocate(self, n: int, shape: tuple, dtype: torch.dtype):
        if self.directory is None:
            return torch.empty((n, *shape), dtype=dtype)
        if dtype == torch.bfloat16:
            raise ValueError("bfloat16 features cannot be stored in an np.memmap: use float16 or float32")
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        return np.lib.format.open_memmap(os.path.join(self.directory, "features.npy"), mode="w+",
                                         dtype=np_dtype, shape=(n, *shape))

    def _write_meta(self, n: int, store: np.ndarray, has_targets: bool) -> None:
        meta = dict(num_examples=n, feature_shape=list(store.shape[1:]), dtype=str(store.dtype),
                    targets=has_targets)
        tmp = os.path.join(self.directory, _META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, _META))

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "FeatureCache":
        """Reopen a cache built with ``directory=`` (features memory-mapped, read-only)."""
        directory = os.fspath(directory)
        meta_path = os.path.join(directory, _META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{directory} holds no complete feature cache (no {_META})")
        with open(meta_path) as f:
            meta = json.load(f)
        feats = np.load(os.path.join(directory, "features.npy"), mmap_mode="r")
        if feats.shape[0] != meta["num_examples"] or list(feats.shape[1:]) != meta["feature_shape"]:
            raise ValueError(f"{directory}/features.npy has shape {feats.shape}, meta.json says "
                             f"{meta['num_examples']} x {meta['feature_shape']}: the cache is damaged")
        self = cls.__new__(cls)
        self.directory = directory
        self._features = _readonly_tensor(feats)
        self._targets = (_readonly_tensor(np.load(os.path.join(directory, "targets.npy"), mmap_mode="r"))
                         if meta["targets"] else None)
        return self

    @property
    def features(self) -> torch.Tensor:
        """All cached features, ``(num_examples, *feature_shape)`` on the CPU (memory-mapped when
        the cache is on disk)."""
        return self._features

    @property
    def targets(self) -> Optional[torch.Tensor]:
        return self._targets

    def __len__(self) -> int:
        return self._features.shape[0]

    def arrays(self) -> tuple:
        """``(features,)`` or ``(features, targets)``: array data for a loader or the Trainer."""
        return (self._features,) if self._targets is None else (self._features, self._targets)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[tuple]:
        """One epoch of ``(features, targets)`` batches (``(features,)`` without targets), in an
        order that depends on ``(seed, epoch)`` only."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        else:
            order = torch.arange(n)
        end = n - n % batch_size if drop_last else n
        arrays = self.arrays()
        for start in range(0, end, batch_size):
            idx = order[start:start + batch_size]
            yield tuple(a.index_select(0, idx) for a in arrays)


def _as_rows(a: Any, what: str):
    if isinstance(a, torch.Tensor):
        if a.dim() == 0:
            raise ValueError(f"{what} must have one example per row, got a 0-d tensor")
        return a
    if isinstance(a, np.ndarray):
        if a.ndim == 0:
            raise ValueError(f"{what} must have one example per row, got a 0-d array")
        return a
    raise TypeError(f"{what} must be a torch tensor or a numpy array, got {type(a).__name__}")


def _to_numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _to_store(t: torch.Tensor, store: Any):
    return t.numpy() if isinstance(store, np.ndarray) else t


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    # torch.from_numpy warns on read-only arrays; the tensor is only ever read (index_select copies).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
