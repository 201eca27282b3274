#!/usr/bin/env python3
"""Independent PyTorch reference of the VT-ResNet contract (shared/spec/vt-resnet.md).

Used only for fixtures, cross-checks and benchmarks; PyTorch is never a runtime
dependency of the Rust project.

    python tools/reference/vt_resnet.py predict --checkpoint DIR IMAGE...

prints one JSON line per image: {"image", "logits", "probs"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCH_BLOCKS = {"vt-resnet18": (2, 2, 2), "vt-resnet34": (3, 4, 6)}
ARCH_VT_MODULES = {"vt-resnet18": 2, "vt-resnet34": 3}
FEATURE_CHANNELS = 256  # C, layer3's width
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
DEFAULT_MEAN = [0.485, 0.456, 0.406]
DEFAULT_STD = [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------- config

def default_config(arch: str = "vt-resnet18", num_classes: int = 6, image_size: int = 224,
                   class_names: Optional[List[str]] = None, tokens: int = 16,
                   token_channels: int = 1024, heads: int = 16) -> dict:
    if arch not in ARCH_BLOCKS:
        raise ValueError(f"unknown arch {arch!r}")
    return {
        "arch": arch,
        "num_classes": num_classes,
        "class_names": class_names if class_names is not None
        else [f"class{i}" for i in range(num_classes)],
        "image_size": image_size,
        "tokens": tokens,
        "token_channels": token_channels,
        "heads": heads,
        "vt_modules": ARCH_VT_MODULES[arch],
        "mean": list(DEFAULT_MEAN),
        "std": list(DEFAULT_STD),
        "variant": "paper",
    }


def validate_config(cfg: dict) -> None:
    arch = cfg["arch"]
    if arch not in ARCH_BLOCKS:
        raise ValueError(f"unknown arch {arch!r}")
    if cfg.get("variant", "paper") != "paper":
        raise ValueError(f"this reference implements only variant 'paper', got {cfg['variant']!r}")
    if cfg["vt_modules"] != ARCH_VT_MODULES[arch]:
        raise ValueError(f"vt_modules {cfg['vt_modules']} disagrees with arch {arch} "
                         f"({ARCH_VT_MODULES[arch]})")
    ct, h = cfg["token_channels"], cfg["heads"]
    if h <= 0 or ct % (2 * h) != 0:
        raise ValueError(f"token_channels {ct} must be divisible by 2*heads ({2 * h})")
    if FEATURE_CHANNELS % h != 0:
        raise ValueError(f"feature channels {FEATURE_CHANNELS} must be divisible by heads {h}")
    if cfg["tokens"] <= 0 or cfg["num_classes"] <= 0:
        raise ValueError("tokens and num_classes must be positive")
    if len(cfg.get("class_names", [])) not in (0, cfg["num_classes"]):
        raise ValueError("class_names length must equal num_classes")


# --------------------------------------------------------------------------- stem

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def make_layer(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride)]
    layers += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- VT stage

class Tokenizer(nn.Module):
    """Filter-based (first module, `attn`) or recurrent (`recur`) tokenizer."""

    def __init__(self, c: int, ct: int, tokens: int, recurrent: bool):
        super().__init__()
        self.recurrent = recurrent
        if recurrent:
            self.recur = nn.Linear(ct, c, bias=False)
        else:
            self.attn = nn.Linear(c, tokens, bias=False)
        self.value = nn.Linear(c, ct, bias=False)
        self.c = c

    def attention(self, x, t_prev=None):
        # x: N x P x C
        if self.recurrent:
            r = self.recur(t_prev)                     # N x L x C
            logits = x @ r.transpose(1, 2)             # N x P x L
        else:
            logits = self.attn(x)                      # N x P x L
        return torch.softmax(logits / math.sqrt(self.c), dim=1)  # softmax over P

    def forward(self, x, t_prev=None):
        a = self.attention(x, t_prev)                  # N x P x L
        v = self.value(x)                              # N x P x CT
        return a.transpose(1, 2) @ v                   # N x L x CT


def split_heads(x, h: int):
    """N x L x (h*d) -> N x h x L x d, head k = channels [k*d, (k+1)*d)."""
    n, l, c = x.shape
    return x.reshape(n, l, h, c // h).transpose(1, 2)


def merge_heads(x):
    """N x h x L x d -> N x L x (h*d)."""
    n, h, l, d = x.shape
    return x.transpose(1, 2).reshape(n, l, h * d)


class Transformer(nn.Module):
    """Paper form: no LayerNorm, values are T itself."""

    def __init__(self, ct: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(ct, ct // 2, bias=False)
        self.query = nn.Linear(ct, ct // 2, bias=False)
        self.ffn1 = nn.Linear(ct, ct)
        self.ffn2 = nn.Linear(ct, ct)

    def forward(self, t):
        h = self.heads
        k = split_heads(self.key(t), h)       # N x h x L x d
        q = split_heads(self.query(t), h)     # N x h x L x d
        v = split_heads(t, h)                 # N x h x L x CT/h
        d = k.shape[-1]
        s = torch.softmax(k @ q.transpose(-1, -2) / math.sqrt(d), dim=-1)  # S[i, j], over j
        t2 = t + merge_heads(s @ v)
        return t2 + self.ffn2(F.relu(self.ffn1(t2)))


class Projector(nn.Module):
    def __init__(self, c: int, ct: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(c, c, bias=False)
        self.key = nn.Linear(ct, c, bias=False)
        self.value = nn.Linear(ct, c, bias=False)

    def forward(self, x, t):
        h = self.heads
        q = split_heads(self.query(x), h)     # N x h x P x d
        k = split_heads(self.key(t), h)       # N x h x L x d
        v = split_heads(self.value(t), h)     # N x h x L x d
        d = q.shape[-1]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # over tokens
        return x + merge_heads(a @ v)


class VTModule(nn.Module):
    def __init__(self, index: int, last: bool, c: int, ct: int, tokens: int, heads: int):
        super().__init__()
        self.tokenizer = Tokenizer(c, ct, tokens, recurrent=index > 0)
        self.transformer = Transformer(ct, heads)
        self.projector = None if last else Projector(c, ct, heads)


class VTResNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        validate_config(cfg)
        self.cfg = dict(cfg)
        b1, b2, b3 = ARCH_BLOCKS[cfg["arch"]]
        c, ct, l, h, m = (FEATURE_CHANNELS, cfg["token_channels"], cfg["tokens"],
                          cfg["heads"], cfg["vt_modules"])
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = make_layer(64, 64, b1, 1)
        self.layer2 = make_layer(64, 128, b2, 2)
        self.layer3 = make_layer(128, 256, b3, 2)
        self.vt = nn.ModuleList([VTModule(i, i == m - 1, c, ct, l, h) for i in range(m)])
        self.head = nn.Linear(ct, cfg["num_classes"])

    def features(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x

    def forward(self, images):
        return self.token_attention(images)[0]

    def token_attention(self, images):
        """Logits and each module's tokenizer attention, reshaped to N x L x H x W."""
        x0 = self.features(images)                         # N x C x H x W
        n, c, hh, ww = x0.shape
        x = x0.flatten(2).transpose(1, 2)                  # N x P x C, p = y*W + x
        t = None
        maps = []
        for mod in self.vt:
            a = mod.tokenizer.attention(x, t)              # N x P x L
            maps.append(a.transpose(1, 2).reshape(n, -1, hh, ww))
            t = mod.tokenizer(x, t)
            t = mod.transformer(t)
            if mod.projector is not None:
                x = mod.projector(x, t)
        return self.head(t.mean(dim=1)), maps


# --------------------------------------------------------------------------- state dict / checkpoint

def contract_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict in contract names: everything except num_batches_tracked."""
    return {k: v for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def load_contract_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Strict load: every contract tensor present with its exact shape, no extra names
    (num_batches_tracked is ignored whatever its dtype)."""
    expected = contract_state_dict(model)
    given = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the contract: missing {missing}, "
                         f"unexpected {unexpected}")
    for k, ref in expected.items():
        if tuple(given[k].shape) != tuple(ref.shape):
            raise ValueError(f"{k}: shape {tuple(given[k].shape)}, expected {tuple(ref.shape)}")
    with torch.no_grad():
        for k, ref in expected.items():
            ref.copy_(given[k].to(ref.dtype))


# Every key the contract requires of config.json: none may fall back to a default.
CONFIG_KEYS = ("arch", "num_classes", "class_names", "image_size", "tokens", "token_channels",
               "heads", "vt_modules", "mean", "std", "variant")


def check_checkpoint(folder: str, cfg: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """What the contract requires of a checkpoint beyond the model's names and shapes: every
    config key, a name for every class, 3-channel mean and std, f32 tensors."""
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{folder}/config.json: missing {missing}")
    if len(cfg["class_names"]) != cfg["num_classes"]:
        raise ValueError(f"{folder}/config.json: {len(cfg['class_names'])} class_names for "
                         f"num_classes {cfg['num_classes']}")
    for key in ("mean", "std"):
        v = cfg[key]
        if not (isinstance(v, list) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"{folder}/config.json: {key} must be 3 numbers, got {v!r}")
    wrong = sorted(f"{k} ({t.dtype})" for k, t in tensors.items()
                   if t.dtype != torch.float32 and not k.endswith("num_batches_tracked"))
    if wrong:
        raise ValueError(f"{folder}/model.safetensors: tensors must be float32: {wrong}")


def load_checkpoint(folder: str) -> VTResNet:
    from safetensors.torch import load_file
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    check_checkpoint(folder, cfg, tensors)
    model = VTResNet(cfg)
    load_contract_state_dict(model, tensors)
    model.eval()
    return model


def save_checkpoint(model: VTResNet, folder: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous()
               for k, v in contract_state_dict(model).items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.cfg, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------- formula weights

def fnv1a32(s: str) -> int:
    h = 2166136261
    for byte in s.encode("utf-8"):
        h ^= byte
        h = (h * 16777619) & 0xFFFFFFFF
    return h


def formula_tensor(name: str, shape) -> np.ndarray:
    """Deterministic weights of tools/reference/README.md, float64 maths, float32 result."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    phase = (fnv1a32(name) % 997) * 0.01
    # math.sin is the C library's sin, the same one Rust's f64::sin calls.
    b = np.array([math.sin(0.731 * i + phase) for i in range(n)], dtype=np.float64)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:], dtype=np.int64))
        v = b * math.sqrt(2.0 / fan_in)
    elif name.endswith("running_mean"):
        v = 0.1 * b
    elif name.endswith("running_var"):
        v = 0.5 + b * b
    elif name.endswith("weight"):
        v = 1.0 + 0.2 * b
    elif name.endswith("bias"):
        v = 0.1 * b
    else:
        raise ValueError(f"no formula for {name}")
    return v.astype(np.float32).reshape(shape)


def formula_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(formula_tensor(k, v.shape))
            for k, v in contract_state_dict(model).items()}


def formula_input(shape) -> torch.Tensor:
    n = int(np.prod(shape))
    x = np.array([math.sin(0.37 * i) * 1.5 for i in range(n)], dtype=np.float64)
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


def formula_loss_weight(shape) -> torch.Tensor:
    n = int(np.prod(shape))
    x = np.array([math.cos(0.53 * i) for i in range(n)], dtype=np.float64)
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


# --------------------------------------------------------------------------- preprocessing

def eval_size(image_size: int) -> int:
    """S = round(image_size * 256 / 224) (never a .5 tie: 256/224 = 8/7)."""
    return (2 * image_size * 256 + 224) // 448


def preprocess(path_or_image, cfg: dict) -> torch.Tensor:
    """Contract eval preprocessing with PIL -> float32 tensor 3 x S x S."""
    from PIL import Image
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    img = img.convert("RGB")  # greyscale replicated, alpha dropped, EXIF ignored
    size = int(cfg["image_size"])
    s = eval_size(size)
    w, h = img.size
    if w <= h:
        nw, nh = s, (h * s) // w
    else:
        nw, nh = (w * s) // h, s
    img = img.resize((nw, nh), Image.BILINEAR)  # PIL: antialiased triangle filter
    top, left = (nh - size) // 2, (nw - size) // 2
    img = img.crop((left, top, left + size, top + size))
    a = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(cfg.get("mean", DEFAULT_MEAN), dtype=np.float32)
    std = np.asarray(cfg.get("std", DEFAULT_STD), dtype=np.float32)
    a = (a - mean) / std
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- CLI

def cmd_predict(args) -> int:
    model = load_checkpoint(args.checkpoint)
    if args.float64:
        model = model.double()
    cfg = model.cfg
    with torch.inference_mode():
        for path in args.images:
            x = preprocess(path, cfg).unsqueeze(0)
            x = x.double() if args.float64 else x
            logits = model(x)[0]
            # A checkpoint `vt-train calibrate` wrote divides its logits by its temperature.
            probs = torch.softmax(logits.double() / cfg.get("temperature", 1.0), dim=0)
            print(json.dumps({"image": path,
                              "logits": [float(v) for v in logits],
                              "probs": [float(v) for v in probs]}), flush=True)
    return 0


def cmd_init(args) -> int:
    """Write a checkpoint with formula weights (handy for cross-checks)."""
    cfg = default_config(args.arch, args.num_classes, args.image_size)
    model = VTResNet(cfg)
    load_contract_state_dict(model, formula_state_dict(model))
    save_checkpoint(model, args.out)
    print(args.out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="print {image, logits, probs} JSON lines")
    pr.add_argument("--checkpoint", required=True, help="folder with config.json + model.safetensors")
    pr.add_argument("--float64", action="store_true", help="compute in float64")
    pr.add_argument("images", nargs="+")
    pr.set_defaults(func=cmd_predict)
    it = sub.add_parser("init-formula", help="write a formula-weights checkpoint")
    it.add_argument("--arch", default="vt-resnet18", choices=sorted(ARCH_BLOCKS))
    it.add_argument("--num-classes", type=int, default=6)
    it.add_argument("--image-size", type=int, default=224)
    it.add_argument("--out", required=True)
    it.set_defaults(func=cmd_init)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
