"""A model written by `vt-train export` run in ONNX Runtime, against this PyTorch reference.

  checkpoint --config CONFIG.json --out DIR
      Writes a checkpoint with the formula weights (README.md) for a config, e.g. a golden
      fixture's crates/vt-model/tests/fixtures/golden-<name>.json, to export with
      `vt-train export --checkpoint DIR --out FILE.onnx`.
  check --onnx FILE.onnx --checkpoint DIR [--batch N ...] [--fixture GOLDEN.safetensors]
        [--images IMAGE...]
      Loads FILE.onnx in onnxruntime (CPU) and the checkpoint in vt_resnet.py, checks the
      graph's inputs, outputs and metadata against the checkpoint's config.json, and for
      each batch size (default 1 and 5) runs both on the formula input
      (x[i] = sin(0.37 i) * 1.5): prints the largest absolute difference of the logits from
      the PyTorch float32 and float64 forward passes, and of the probabilities from the
      float64 softmax, one JSON line per batch size. With --fixture, also on the fixture's
      `input` against its `logits_eval` (computed in float64); with --images, on those
      photos as one batch, preprocessed as the contract says (vt_resnet.preprocess).
      Exits 1 when a logit differs from the float64 one by more than --tolerance times the
      largest logit (default 1e-4) and by more than twice PyTorch's own float32 error.

Needs onnxruntime besides vt_resnet.py's packages (`pip install onnxruntime`); with the
`onnx` package installed, `check` also runs its full model checker first.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vt_resnet as vt  # noqa: E402


def cmd_checkpoint(args) -> int:
    with open(args.config) as f:
        cfg = json.load(f)
    model = vt.VTResNet(cfg)
    vt.load_contract_state_dict(model, vt.formula_state_dict(model))
    vt.save_checkpoint(model, args.out)
    print(args.out)
    return 0


def check_signature(session: ort.InferenceSession, cfg: dict) -> list:
    """Problems with the graph's inputs, outputs and metadata, as messages."""
    s, k = cfg["image_size"], cfg["num_classes"]
    expected = {
        "inputs": [("image", ["batch", 3, s, s])],
        "outputs": [("logits", ["batch", k]), ("probabilities", ["batch", k])],
    }
    found = {
        "inputs": [(i.name, i.shape) for i in session.get_inputs()],
        "outputs": [(o.name, o.shape) for o in session.get_outputs()],
    }
    problems = [f"{what}: {found[what]}, expected {expected[what]}"
                for what in expected if found[what] != expected[what]]
    meta = session.get_modelmeta().custom_metadata_map
    want = {
        "arch": cfg["arch"], "variant": cfg.get("variant", "paper"),
        "class_names": cfg["class_names"], "image_size": s, "mean": cfg["mean"],
        "std": cfg["std"], "tokens": cfg["tokens"], "token_channels": cfg["token_channels"],
        "heads": cfg["heads"],
    }
    for key, value in want.items():
        got = meta.get(key)
        parsed = got if isinstance(value, str) else (json.loads(got) if got else None)
        if isinstance(value, list) and parsed is not None and all(
                isinstance(v, float) for v in value):
            same = np.allclose(np.float32(parsed), np.float32(value), rtol=0, atol=0)
        else:
            same = parsed == value
        if not same:
            problems.append(f"metadata {key}: {got!r}, expected {value!r}")
    return problems


def compare(session, model32, model64, x: np.ndarray) -> dict:
    logits, probs = session.run(["logits", "probabilities"], {"image": x})
    with torch.inference_mode():
        ref32 = model32(torch.from_numpy(x)).numpy()
        ref64 = model64(torch.from_numpy(x).double())
        probs64 = torch.softmax(ref64, dim=1).numpy()
        ref64 = ref64.numpy()
    return {
        "batch": int(x.shape[0]),
        "logits_shape": list(logits.shape),
        "max_abs_logits_vs_torch_f32": float(np.abs(logits - ref32).max()),
        "max_abs_logits_vs_torch_f64": float(np.abs(logits - ref64).max()),
        "max_abs_torch_f32_vs_f64": float(np.abs(ref32 - ref64).max()),
        "max_abs_probs_vs_torch_f64": float(np.abs(probs - probs64).max()),
        "max_abs_logit": float(np.abs(ref64).max()),
    }


def cmd_check(args) -> int:
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        onnx.checker.check_model(onnx.load(args.onnx), full_check=True)
    model32 = vt.load_checkpoint(args.checkpoint)
    model64 = vt.load_checkpoint(args.checkpoint).double()
    cfg = model32.cfg
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    failed = check_signature(session, cfg)
    with open(os.path.join(args.checkpoint, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if session.get_modelmeta().custom_metadata_map.get("sha256") != digest:
        failed.append("metadata sha256 is not model.safetensors' digest")
    s = cfg["image_size"]
    rows = []
    for n in args.batch:
        x = vt.formula_input((n, 3, s, s)).numpy()
        rows.append({"input": "formula", **compare(session, model32, model64, x)})
    if args.images:
        x = torch.stack([vt.preprocess(path, cfg) for path in args.images]).numpy()
        rows.append({"input": "images", **compare(session, model32, model64, x)})
    if args.fixture:
        from safetensors.torch import load_file
        golden = load_file(args.fixture)
        x = golden["input"].numpy()
        row = {"input": "fixture", **compare(session, model32, model64, x)}
        logits = session.run(["logits"], {"image": x})[0]
        row["max_abs_logits_vs_fixture"] = float(
            np.abs(logits - golden["logits_eval"].double().numpy()).max())
        rows.append(row)
    for row in rows:
        # float32 rounding grows with the logits (an untrained model's reach 50): ONNX
        # Runtime passes when as close to the float64 truth as PyTorch's float32 is.
        allowed = max(args.tolerance * row["max_abs_logit"], 2 * row["max_abs_torch_f32_vs_f64"])
        # The fixture's logits are float64 too, from the reference that wrote it.
        error = max(row["max_abs_logits_vs_torch_f64"], row.get("max_abs_logits_vs_fixture", 0.0))
        row["within_tolerance"] = error <= allowed
        print(json.dumps({"onnx": args.onnx, "onnxruntime": ort.__version__, **row}), flush=True)
        if not row["within_tolerance"]:
            failed.append(f"batch {row['batch']} ({row['input']}): logits differ from float64 "
                          f"by {error:.3g}, more than {allowed:.3g}")
    for problem in failed:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("checkpoint", help="write a formula-weights checkpoint for a config")
    ck.add_argument("--config", required=True, help="a config.json (e.g. a golden fixture's)")
    ck.add_argument("--out", required=True)
    ck.set_defaults(func=cmd_checkpoint)
    ch = sub.add_parser("check", help="compare the ONNX model's outputs with PyTorch's")
    ch.add_argument("--onnx", required=True)
    ch.add_argument("--checkpoint", required=True, help="the checkpoint it was exported from")
    ch.add_argument("--batch", type=int, nargs="+", default=[1, 5])
    ch.add_argument("--fixture", help="a golden-<name>.safetensors of the same config")
    ch.add_argument("--images", nargs="+", default=[],
                    help="photos, preprocessed as the contract says, run as one batch too")
    ch.add_argument("--tolerance", type=float, default=1e-4,
                    help="logit difference from float64 allowed, relative to the largest "
                         "logit (twice PyTorch's float32 difference when that is more)")
    ch.add_argument("--threads", type=int, default=2)
    ch.set_defaults(func=cmd_check)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
