"""Train the digits ViT and write ``quant/zoo/weights/digits_vit.safetensors``.

    python -m quant.zoo.train_digits [--epochs 60] [--out PATH]

A ViT learns slowly from 1,437 images: a small width, AdamW with a strong learning rate after a
warm-up, cosine decay, label smoothing and random shifts of up to half an original pixel (2 of
32 px; a whole pixel is too much for 8×8 digits).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .digits import WEIGHTS, digits_vit, load_digits_split


def shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translation (zero-padded with the background value) per image."""
    pad = F.pad(x, (max_px,) * 4, value=float(x.min()))
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def train(epochs: int = 60, batch: int = 32, lr: float = 3e-3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_split()
    model = digits_vit(pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(data.x_train) / batch)
    total, warm = epochs * steps_per_epoch, 3 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total))))
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(data.x_train), generator=gen)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x = shift(data.x_train[idx], gen)
            loss = F.cross_entropy(model(x), data.y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == epochs - 1:
            acc = accuracy(model, data.x_test, data.y_test)
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  test top-1 {acc:.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the model is too small to gain from more; default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = train(args.epochs, seed=args.seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
