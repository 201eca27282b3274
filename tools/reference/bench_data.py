"""torchvision's ImageFolder + DataLoader throughput with the notebook's transforms, for
comparison with `cargo xtask bench data` (same folder, image size, batch size, workers).

Run: /root/.cache/vt/torch-venv/bin/python tools/reference/bench_data.py [--images DIR]
"""

import argparse
import time

import torch
from torchvision import datasets, transforms

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", default="../shared/data/intel-sample/seg_train")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--warmup-batches", type=int, default=10, help="loaded untimed before each measured pass")
    a = p.parse_args()
    s = a.image_size
    pipelines = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(s, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            transforms.RandomRotation(15),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(*IMAGENET),
        ]),
        "eval": transforms.Compose([
            transforms.Resize(round(s * 256 / 224)),
            transforms.CenterCrop(s),
            transforms.ToTensor(),
            transforms.Normalize(*IMAGENET),
        ]),
    }
    torch.set_num_threads(1)
    for name, tfm in pipelines.items():
        ds = datasets.ImageFolder(a.images, transform=tfm)
        for workers in [int(w) for w in a.workers.split(",")]:
            dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=workers)
            for _ in zip(range(a.warmup_batches), dl):
                pass
            start = time.perf_counter()
            n = sum(x.shape[0] for x, _ in dl)
            secs = time.perf_counter() - start
            print(f"  torchvision {name:5} workers {workers}: {n} images in {secs:.2f} s = {n / secs:.0f} images/s")


if __name__ == "__main__":
    main()
