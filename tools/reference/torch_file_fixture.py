#!/usr/bin/env python3
"""Write crates/vt-model/tests/fixtures/torch-state-dict.pth, the PyTorch file that
vt-model's reader of `torch.save` checkpoints is tested on (src/torch_file.rs).

    python tools/reference/torch_file_fixture.py [--out crates/vt-model/tests/fixtures]

A state dict as training scripts save it, under `state_dict` beside an epoch and a tensor
(pytorch/examples' ImageNet script saves `best_acc1` so), whose tensors cover what the
reader must handle: a `module.` prefix (DataParallel), f16 and f64 values, a view into a
larger storage (a storage offset), a transposed (column-major) tensor, a channels-last
weight, a strided slice, an integer `num_batches_tracked` and a bool tensor (a storage type
the reader cannot convert). The values are small integer formulas the test recomputes.
"""

from __future__ import annotations

import argparse
import os

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "crates", "vt-model", "tests", "fixtures")


def state_dict() -> dict:
    storage = torch.arange(20, dtype=torch.float64)
    return {
        "module.conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
        "module.bn.running_var": (torch.arange(6, dtype=torch.float32) / 4).half(),
        "module.bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "module.offset": storage[5:11],
        "module.transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
        "module.channels_last": torch.arange(16, dtype=torch.float32)
        .reshape(1, 4, 2, 2)
        .contiguous(memory_format=torch.channels_last),
        "module.strided": torch.arange(10, dtype=torch.float32)[::3],
        "flag": torch.tensor([True, False]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    path = os.path.join(args.out, "torch-state-dict.pth")
    torch.save({"epoch": 3, "best_acc1": torch.tensor(0.5), "state_dict": state_dict()}, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, torch {torch.__version__})")


if __name__ == "__main__":
    main()
