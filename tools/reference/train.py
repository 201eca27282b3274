#!/usr/bin/env python3
"""PyTorch baseline of `vt-train`'s recipes, for the real-data comparison (bench/RESULTS.md).

Same data folder (train/<class>/, val/<class>/ as `cargo xtask fetch-data` writes), same
model (vt_resnet.VTResNet, the contract), same recipe, schedule, clipping, weight-decay
groups and evaluation preprocessing as crates/vt-train; writes RUN/metrics.jsonl with the
same keys. PyTorch is never a runtime dependency of the Rust project.

    python tools/reference/train.py --data DIR --run-dir DIR --recipe modern \
        --image-size 112 --epochs 3 --threads 2 --loader-workers 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vt_resnet import VTResNet, default_config, preprocess, save_checkpoint  # noqa: E402

RECIPES = {
    # optimiser, lr, weight decay, warmup epochs, label smoothing, clip, decay, crop scale, rotation
    "seed": dict(opt="sgd", lr=0.01, wd=0.0, warmup=1.0, ls=0.0, clip=5.0, decay="step",
                 scale=(0.08, 1.0), rotation=15.0, arch="vt-resnet34", epochs=25),
    "modern": dict(opt="adamw", lr=5e-4, wd=0.05, warmup=2.0, ls=0.1, clip=1.0, decay="cosine",
                   scale=(0.35, 1.0), rotation=0.0, arch="vt-resnet18", epochs=30),
}


def lr_at(step: int, base: float, decay: str, warmup_steps: int, steps_per_epoch: int,
          total_steps: int) -> float:
    """crates/vt-train/src/schedule.rs, line for line."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if decay == "step":
        return base * 0.1 ** ((step // max(steps_per_epoch, 1)) // 7)
    min_lr = 1e-6
    span = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / span, 1.0)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class EvalFolder(Dataset):
    """The contract's evaluation preprocessing (vt_resnet.preprocess)."""

    def __init__(self, root: str, cfg: dict):
        self.inner = datasets.ImageFolder(root)
        self.cfg = cfg

    def __len__(self):
        return len(self.inner.samples)

    def __getitem__(self, i):
        path, label = self.inner.samples[i]
        return preprocess(path, self.cfg), label


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="modern")
    p.add_argument("--arch")
    p.add_argument("--image-size", type=int, default=150)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)

    r = RECIPES[args.recipe]
    arch = args.arch or r["arch"]
    epochs = args.epochs or r["epochs"]
    base_lr = args.lr or r["lr"]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    os.makedirs(args.run_dir, exist_ok=True)

    size = args.image_size
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = [transforms.RandomResizedCrop(size, scale=r["scale"])]
    if r["rotation"]:
        train_tf.append(transforms.RandomRotation(r["rotation"]))
    train_tf += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
    train_set = datasets.ImageFolder(os.path.join(args.data, "train"), transforms.Compose(train_tf))
    classes = train_set.classes
    cfg = default_config(arch, len(classes), size, class_names=classes)
    val_set = EvalFolder(os.path.join(args.data, "val"), cfg)
    drop_last = len(train_set) > args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    pin = args.device.startswith("cuda")
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=drop_last,
                              num_workers=args.loader_workers, generator=gen, pin_memory=pin)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.loader_workers,
                            pin_memory=pin)

    model = VTResNet(cfg).to(args.device)
    # timm's convention, as vt-train: no weight decay on tensors of rank < 2.
    decay = [q for q in model.parameters() if q.ndim >= 2]
    no_decay = [q for q in model.parameters() if q.ndim < 2]
    groups = [{"params": decay, "weight_decay": r["wd"]}, {"params": no_decay, "weight_decay": 0.0}]
    if r["opt"] == "sgd":
        opt = torch.optim.SGD(groups, lr=base_lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=base_lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = max(len(train_loader), 1)
    warmup_steps = round(r["warmup"] * steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    step = 0
    metrics = open(os.path.join(args.run_dir, "metrics.jsonl"), "w")
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        loss_sum, correct, images, norms, clipped = 0.0, 0, 0, [], 0
        lr = base_lr
        for x, y in train_loader:
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            lr = lr_at(step, base_lr, r["decay"], warmup_steps, steps_per_epoch, total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=r["ls"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = r["clip"] if r["clip"] > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            clipped += norm > r["clip"] > 0
            opt.step()
            step += 1
            n = y.numel()
            # float() waits for the GPU, so img/s counts finished work.
            loss_sum += float(loss.detach()) * n
            correct += int((logits.argmax(1) == y).sum())
            images += n
            norms.append(norm)
        train_time = time.perf_counter() - start
        model.eval()
        val_loss, val_correct, val_images = 0.0, 0, 0
        with torch.inference_mode():
            for x, y in val_loader:
                x, y = x.to(args.device), y.to(args.device)
                logits = model(x)
                val_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                val_correct += int((logits.argmax(1) == y).sum())
                val_images += y.numel()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / images,
            "train_acc": correct / images,
            "val_loss": val_loss / val_images,
            "val_acc": val_correct / val_images,
            "lr": lr,
            "img_per_s": images / train_time,
            "epoch_time_s": time.perf_counter() - start,
            "grad_norm_mean": sum(norms) / len(norms),
            "grad_norm_max": max(norms),
            "clipped_steps": int(clipped),
            "global_step": step,
        }
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        print(json.dumps(record), flush=True)
    save_checkpoint(model, os.path.join(args.run_dir, "last"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
