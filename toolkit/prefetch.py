"""Loading ahead: the next items decode while the model works on the current one.

:func:`prefetched` is every stage's input pipeline: ``load(item)`` for each item, in order,
one item ahead in a background thread (``workers=0``, the default: decoding releases the GIL
in PIL and OpenCV), or in ``workers`` DataLoader processes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class _Items(torch.utils.data.Dataset):
    """Item k -> load(items[k]), for DataLoader workers (``load`` must pickle: a module-level
    function or a ``functools.partial`` of one)."""

    def __init__(self, items: Sequence, load: Callable):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        return self.load(self.items[k])


def _as_is(item):
    return item


def prefetched(items: Sequence[T], load: Callable[[T], R], workers: int = 0) -> Iterator[R]:
    """``load(item)`` for every item, in order, loaded ahead of the consumer.

    ``load`` reports a bad item by returning it (an exception object the caller checks for),
    not by raising: an exception raised here would end the iteration."""
    if workers > 0:
        yield from torch.utils.data.DataLoader(_Items(items, load), batch_size=None, num_workers=workers,
                                               collate_fn=_as_is)
        return
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[0])
        for k in range(len(items)):
            loaded = pending.result()
            if k + 1 < len(items):
                pending = pool.submit(load, items[k + 1])
            yield loaded
