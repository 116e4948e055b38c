"""Images read in batches from a dataset, for evaluation sets too large to hold in memory.

ImageNet's 50,000 validation images at 224² are ~30 GB as float32; a stream holds only the
sample ids, their labels (read from the dataset's index, not from the images) and, while it is
read, a few batches in flight. Evaluation (``quant.evaluate.logits_of``) and candidate scoring
read it batch by batch, so a job's memory does not grow with the number of images: what grows is
the logits kept for the comparison, ``classes`` floats per image (0.4 KB for 100 classes, against
600 KB for the image itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


@dataclass(frozen=True)
class ImageStream:
    """``ids`` of ``dataset`` (items ``(image, label)``, e.g. an ImageFolder with the model's
    preprocessing), read in ``batch_size`` batches by ``workers`` DataLoader processes (0: read
    in the calling process, as a Ray actor that holds one CPU does)."""

    dataset: Dataset
    ids: tuple[int, ...]
    labels: Tensor
    batch_size: int = 32
    workers: int = 2

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int | None = None) -> Iterator[Tensor]:
        if not self.ids:
            return
        loader = DataLoader(Subset(self.dataset, list(self.ids)),
                            batch_size=batch_size or self.batch_size, shuffle=False,
                            num_workers=self.workers)
        for x, _ in loader:
            yield x

    def in_process(self) -> ImageStream:
        """The same images read without worker processes (inside a Ray actor)."""
        return replace(self, workers=0)

    def head(self, n: int) -> Tensor:
        """The first ``n`` images as one tensor (a small sample: plots, probes)."""
        return torch.stack([self.dataset[i][0] for i in self.ids[:n]])


def stream_logits(model: Callable[[Tensor], Tensor], images: ImageStream, device,
                  progress: Callable[[int], None] | None = None) -> Tensor:
    """The model's logits on every image of the stream, batch by batch."""
    out, done = [], 0
    with torch.no_grad():
        for x in images.batches():
            out.append(model(x.to(device)).float().cpu())
            done += len(x)
            if progress is not None:
                progress(done)
    return torch.cat(out) if out else torch.empty(0)


def stratified_sample(labels: Sequence[int] | Tensor, n: int, seed: int,
                      exclude: Sequence[int] = ()) -> list[int]:
    """``n`` indices drawn class by class in turn (each class's own order shuffled by the seed),
    so every class gets ``n // classes`` or one more while it has samples: a ``test_limit`` of
    1,000 over 100 classes takes 10 of each, where the first 1,000 of an ImageFolder (sorted by
    class) cover 10 classes. Returned sorted, as the dataset's order."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    keep = torch.ones(len(labels), dtype=torch.bool)
    if len(exclude):
        keep[torch.as_tensor(list(exclude), dtype=torch.int64)] = False
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(labels[keep]).tolist():
        members = torch.nonzero((labels == c) & keep).flatten()
        per_class.append(members[torch.randperm(len(members), generator=g)].tolist())
    # the classes of a last, partial round: a seeded draw, not the lowest class ids
    per_class = [per_class[i] for i in torch.randperm(len(per_class), generator=g).tolist()]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(m) for m in per_class):
        picked += [m[depth] for m in per_class if depth < len(m)][: n - len(picked)]
        depth += 1
    return sorted(picked)
