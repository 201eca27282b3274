#!/usr/bin/env python3
"""Time the PyTorch eager reference of VT-ResNet (a baseline for the Rust benchmarks).

    python tools/reference/bench_model.py --arch vt-resnet18 --image-size 150 --batch 32 \
        --mode infer --threads 2 --iters 5 --warmup 1 --json
    python tools/reference/bench_model.py --threads 2 --iters 5 --warmup 1 --json \
        --cases "train:vt-resnet18:150:32,infer:vt-resnet18:150:1"

infer: eval-mode forward under torch.inference_mode, in --dtype (float32, or bfloat16 /
float16: weights and input converted, as `vt-serve --dtype` does).
train: train-mode forward, cross-entropy, backward, SGD step (lr 0.01, momentum 0.9).
Model: the contract defaults (L 16, CT 1024, heads 16), 6 classes, PyTorch's default init,
random input (seeded). Prints one line per case; with --json,
{"arch","image_size","batch","mode","img_s"} (plus a few informative extra keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vt_resnet as vt  # noqa: E402


def parse_cases(text: str):
    cases = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 4 or parts[0] not in ("train", "infer"):
            raise SystemExit(f"bad case {item!r}: want MODE:ARCH:IMAGE_SIZE:BATCH, MODE train|infer")
        cases.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
    return cases


def bench_case(mode: str, arch: str, image_size: int, batch: int, iters: int, warmup: int,
               num_classes: int, device: str, seed: int, dtype: str = "float32") -> dict:
    torch.manual_seed(seed)
    cfg = vt.default_config(arch, num_classes, image_size)
    model = vt.VTResNet(cfg).to(device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    if mode == "infer":
        model.eval()
        model.to(getattr(torch, dtype))
        x = x.to(getattr(torch, dtype))

        # The logits come back to the host every time, as a served prediction's must (and as
        # vt's side does); without it a GPU loop only queues work.
        def step():
            with torch.inference_mode():
                model(x).float().sum().item()
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    secs = time.perf_counter() - t0
    return {"arch": arch, "image_size": image_size, "batch": batch, "mode": mode,
            "img_s": batch * iters / secs, "iters": iters, "seconds": secs,
            "threads": torch.get_num_threads(), "device": device,
            "dtype": dtype if mode == "infer" else "float32",
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vt-resnet18", choices=sorted(vt.ARCH_BLOCKS))
    p.add_argument("--image-size", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mode", choices=("train", "infer"), default="infer")
    p.add_argument("--cases", help='several cases in one process: "MODE:ARCH:SIZE:BATCH,..."')
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="precision of infer cases (train cases stay float32)")
    p.add_argument("--mkldnn-bf16", action="store_true",
                   help='float32 convolutions and products on the CPU in bfloat16 '
                        '(torch.backends.mkldnn.fp32_precision = "bf16")')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    if args.mkldnn_bf16:
        torch.backends.mkldnn.fp32_precision = "bf16"
    cases = parse_cases(args.cases) if args.cases else [
        (args.mode, args.arch, args.image_size, args.batch)]
    for mode, arch, size, batch in cases:
        r = bench_case(mode, arch, size, batch, args.iters, args.warmup, args.num_classes,
                       args.device, args.seed, args.dtype)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['mode']:5s} {r['arch']} {r['image_size']}px batch {r['batch']}: "
                  f"{r['img_s']:.2f} img/s ({r['iters']} iters, {r['seconds']:.2f} s, "
                  f"{r['threads']} threads, {r['device']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
