#!/usr/bin/env python3
"""Write the golden fixtures of crates/vt-model/tests/fixtures from formula weights.

    python tools/reference/make_fixtures.py [--out crates/vt-model/tests/fixtures]

Everything is computed in float64 (model.double()) from the float32 formula weights and
inputs, then stored as float32. See tools/reference/README.md for the tensor list.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vt_resnet as vt  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "crates", "vt-model", "tests", "fixtures")

# A gradient with more elements than this is stored as its first GRAD_SLICE_ROWS rows
# along dim 0 (keeps the fixtures small); compare against full.narrow(0, 0, rows).
GRAD_MAX_ELEMENTS = 100_000
GRAD_SLICE_ROWS = 16

CONFIGS = [
    dict(name="vt-resnet18", arch="vt-resnet18", image_size=40, tokens=4, token_channels=32,
         heads=2, num_classes=5, batch=2),
    dict(name="vt-resnet34", arch="vt-resnet34", image_size=32, tokens=4, token_channels=32,
         heads=2, num_classes=5, batch=2),
]

GRAD_PARAMS = [
    "conv1.weight", "bn1.weight", "layer3.0.downsample.0.weight", "layer3.1.conv2.weight",
    "vt.0.tokenizer.attn.weight", "vt.0.tokenizer.value.weight", "vt.1.tokenizer.recur.weight",
    "vt.0.transformer.key.weight", "vt.0.transformer.query.weight",
    "vt.0.transformer.ffn1.weight", "vt.0.transformer.ffn2.bias",
    "vt.0.projector.query.weight", "vt.0.projector.key.weight", "vt.0.projector.value.weight",
    "head.weight", "head.bias",
]
GRAD_PARAMS_34 = ["vt.2.tokenizer.recur.weight", "vt.1.projector.value.weight"]
RUNNING_BNS = ["bn1", "layer3.0.bn2"]
FORMULA_CHECK = ["bn1.running_var", "vt.0.tokenizer.attn.weight", "head.bias"]


def make_config(spec: dict) -> dict:
    n = spec["num_classes"]
    cfg = vt.default_config(spec["arch"], n, spec["image_size"],
                            class_names=[f"c{i}" for i in range(n)],
                            tokens=spec["tokens"], token_channels=spec["token_channels"],
                            heads=spec["heads"])
    vt.validate_config(cfg)
    return cfg


def formula_model(cfg: dict) -> vt.VTResNet:
    model = vt.VTResNet(cfg).double()
    vt.load_contract_state_dict(model, vt.formula_state_dict(model))
    return model


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).cpu().contiguous()


def build(spec: dict):
    cfg = make_config(spec)
    n, s, k = spec["batch"], cfg["image_size"], cfg["num_classes"]
    x32 = vt.formula_input((n, 3, s, s))
    lw32 = vt.formula_loss_weight((n, k))
    out = {"input": x32, "loss_weight": lw32}

    model = formula_model(cfg)
    sd = vt.contract_state_dict(model)
    for name in FORMULA_CHECK:
        out[f"formula.{name}"] = f32(sd[name])

    # eval mode: running statistics
    model.eval()
    with torch.no_grad():
        logits, maps = model.token_attention(x32.double())
        out["logits_eval"] = f32(logits)
        for i, a in enumerate(maps):
            out[f"attention.{i}"] = f32(a)

    # train mode: batch statistics, one forward, loss, backward (fresh formula weights)
    model = formula_model(cfg)
    model.train()
    x = x32.double().requires_grad_(True)
    logits = model(x)
    loss = (logits * lw32.double()).sum()
    loss.backward()
    out["logits_train"] = f32(logits)
    out["grad.input"] = f32(x.grad)
    params = dict(model.named_parameters())
    names = GRAD_PARAMS + (GRAD_PARAMS_34 if spec["arch"] == "vt-resnet34" else [])
    for name in names:
        g = params[name].grad
        if g.numel() > GRAD_MAX_ELEMENTS:
            g = g[:GRAD_SLICE_ROWS]
        out[f"grad.{name}"] = f32(g)
    sd = vt.contract_state_dict(model)
    for bn in RUNNING_BNS:
        for stat in ("running_mean", "running_var"):
            out[f"running.{bn}.{stat}"] = f32(sd[f"{bn}.{stat}"])
    return cfg, out, float(loss.detach())


def f32_reference_errors(spec: dict, cfg: dict, ref: dict) -> dict:
    """How far PyTorch float32 lands from the float64 fixture, per tensor:
    max|f32 - fixture| / max|fixture|. A guide for the tolerances of float32 tests (train-mode
    gradients of the tiny resnet34 config are ill-conditioned in float32; test them in f64)."""
    model = vt.VTResNet(cfg)
    vt.load_contract_state_dict(model, vt.formula_state_dict(model))
    model.eval()
    got = {}
    with torch.no_grad():
        got["logits_eval"] = model(ref["input"])
    model.train()
    x = ref["input"].clone().requires_grad_(True)
    logits = model(x)
    (logits * ref["loss_weight"]).sum().backward()
    got["logits_train"] = logits.detach()
    got["grad.input"] = x.grad
    params = dict(model.named_parameters())
    sd = vt.contract_state_dict(model)
    errs = {}
    for k, r in ref.items():
        if k.startswith("grad.") and k != "grad.input":
            g = params[k[5:]].grad[: r.shape[0]]
        elif k.startswith("running."):
            g = sd[k[8:]]
        elif k in got:
            g = got[k]
        else:
            continue
        errs[k] = float("%.2e" % ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return errs


def main(argv=None) -> int:
    from safetensors.torch import save_file
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(True)
    for spec in CONFIGS:
        cfg, tensors, loss = build(spec)
        meta = {
            "config": json.dumps(cfg),
            "loss": repr(loss),
            "grad_slice": f"gradients with more than {GRAD_MAX_ELEMENTS} elements hold rows "
                          f"[0, {GRAD_SLICE_ROWS}) of dim 0",
            "generator": "tools/reference/make_fixtures.py",
            "f32_reference_rel_err": json.dumps(f32_reference_errors(spec, cfg, tensors)),
        }
        st_path = os.path.join(args.out, f"golden-{spec['name']}.safetensors")
        save_file(tensors, st_path, metadata=meta)
        with open(os.path.join(args.out, f"golden-{spec['name']}.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        print(f"{st_path}: {os.path.getsize(st_path)} bytes, loss {loss:.9g}")
        for k, v in tensors.items():
            print(f"  {k} {list(v.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
