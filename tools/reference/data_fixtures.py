"""Reference outputs of PIL/torchvision for vt-data's transform tests.

Writes small generated images (one per colour type the loader must handle) into
crates/vt-data/tests/fixtures/ and, under expected/, what torchvision makes of them:
the evaluation transform (Resize(round(S*256/224)) + CenterCrop(S), S=64), a fixed
resized crop, and a rotation. The expected images are PNG, i.e. exactly the uint8 pixels
torchvision hands to ToTensor, so the Rust tests compare after normalising both sides.

Under expected/trivial_augment/ it writes TrivialAugmentWide's operations: a small generated
PNG input, torchvision's own `_apply_op` (PIL path, BILINEAR, fill None) on it for each of the
14 ops at fixed bins and signs, and index.json with the cases and torch's magnitude tables.

Run: /root/.cache/vt/torch-venv/bin/python tools/reference/data_fixtures.py
     (add `--only trivial-augment` to write just the TrivialAugmentWide fixtures)
"""

import argparse
import json
import pathlib

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision import transforms
from torchvision.transforms.autoaugment import TrivialAugmentWide, _apply_op

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "vt-data" / "tests" / "fixtures"
EXP = OUT / "expected"
TA = EXP / "trivial_augment"
EVAL_SIZE = 64


def pattern(w, h, seed, noise=6.0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 6.28)
        v = 128 + 80 * np.sin(x * fx + y * fy + ph) + 30 * np.cos(x * fy * 0.7 - y * fx * 1.3)
        chans.append(v)
    img = np.stack(chans, axis=-1)
    img += rng.normal(0, noise, img.shape)  # some texture, so resampling errors show
    return np.clip(img, 0, 255).astype(np.uint8)


def make_inputs():
    OUT.mkdir(parents=True, exist_ok=True)
    files = {}
    rgb = Image.fromarray(pattern(150, 150, 1), "RGB")
    rgb.save(OUT / "rgb.jpg", quality=90)
    files["rgb.jpg"] = "RGB JPEG 150x150"
    grey = Image.fromarray(pattern(500, 374, 2, noise=0)[..., 0], "L")  # smooth: PNG stays small
    grey.save(OUT / "grey_png_named.jpg", format="PNG", optimize=True)
    files["grey_png_named.jpg"] = "greyscale PNG named .jpg, 500x374 (like seg_pred/7606.jpg)"
    pal = Image.fromarray(pattern(120, 90, 3), "RGB").quantize(64)
    pal.save(OUT / "palette.png", optimize=True)
    files["palette.png"] = "palette PNG 120x90"
    rgba = np.dstack([pattern(100, 140, 4, noise=2), np.linspace(0, 255, 100 * 140).reshape(140, 100).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(OUT / "rgba.png", optimize=True)
    files["rgba.png"] = "RGBA PNG 100x140 (alpha is dropped, not composited)"
    Image.fromarray(pattern(80, 80, 5), "RGB").convert("CMYK").save(OUT / "cmyk.jpg", quality=90)
    files["cmyk.jpg"] = "CMYK JPEG 80x80"
    Image.fromarray(pattern(90, 160, 6)[..., 1], "L").save(OUT / "grey.jpg", quality=90)
    files["grey.jpg"] = "greyscale JPEG 90x160"
    return files


def trivial_augment_fixtures():
    """Each TrivialAugmentWide op through torchvision's own `_apply_op` on a PIL image.

    Magnitudes are looked up in TrivialAugmentWide's own tables (torch float32 values, as
    its forward passes them) and written as repr strings, so the Rust side parses them
    exactly. The inputs are PNG, so no JPEG decoder difference enters.
    """
    TA.mkdir(parents=True, exist_ok=True)
    space = TrivialAugmentWide()._augmentation_space(31)
    inputs = {
        "input.png": Image.fromarray(pattern(32, 24, 7, noise=4.0), "RGB"),
        # Square: PIL turns it a quarter by transposing instead of the affine warp.
        "square.png": Image.fromarray(pattern(24, 24, 8, noise=4.0), "RGB"),
    }
    for name, img in inputs.items():
        img.save(TA / name, optimize=True)
    bins = {"TranslateX": [10, 15, 30], "TranslateY": [10, 15, 30], "Rotate": [10, 20, 30], "Solarize": [3, 10, 30]}
    cases = []

    def run(op, bin_, negative, input_name):
        magnitudes, signed = space[op]
        magnitude = float(magnitudes[bin_].item()) if magnitudes.ndim > 0 else 0.0
        if negative:
            magnitude *= -1.0
        # Bilinear, as torchvision's reference recipe (references/classification) passes it.
        out = _apply_op(inputs[input_name], op, magnitude, interpolation=InterpolationMode.BILINEAR, fill=None)
        stem = op if bin_ is None else f"{op}_b{bin_}{'_neg' if negative else ''}"
        if input_name != "input.png":
            stem += "_" + input_name.removesuffix(".png")
        out.save(TA / f"{stem}.png", optimize=True)
        cases.append({"op": op, "bin": bin_, "negative": negative, "magnitude": repr(magnitude), "input": input_name, "output": f"{stem}.png"})

    for op, (magnitudes, signed) in space.items():
        if magnitudes.ndim == 0:
            run(op, None, False, "input.png")
            continue
        for bin_ in bins.get(op, [10, 30]):
            for negative in [False, True] if signed else [False]:
                run(op, bin_, negative, "input.png")
    for negative in [False, True]:
        run("Rotate", 20, negative, "square.png")
    tables = {
        op: {"signed": signed, "magnitudes": None if m.ndim == 0 else [repr(float(v)) for v in m.tolist()]}
        for op, (m, signed) in space.items()
    }
    index = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ops": list(space),
        "tables": tables,
        "cases": cases,
    }
    (TA / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(p.stat().st_size for p in TA.iterdir())
    print(f"wrote {len(cases)} TrivialAugmentWide cases, {total / 1024:.0f} KiB under {TA}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["trivial-augment"], help="write only these fixtures")
    args = parser.parse_args()
    if args.only == "trivial-augment":
        trivial_augment_fixtures()
        return
    files = make_inputs()
    EXP.mkdir(parents=True, exist_ok=True)
    resize = round(EVAL_SIZE * 256 / 224)
    evaluate = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(EVAL_SIZE)])
    for name in files:
        img = Image.open(OUT / name).convert("RGB")
        evaluate(img).save(EXP / f"{name}.eval{EVAL_SIZE}.png")
    rgb = Image.open(OUT / "rgb.jpg").convert("RGB")
    # RandomResizedCrop's resize step for a fixed box: top 20, left 10, height 80, width 100.
    F.resized_crop(rgb, 20, 10, 80, 100, [48, 48], antialias=True).save(EXP / "rgb.jpg.rrc48.png")
    # Rotations of the top-left 48x40 corner (kept small): RandomRotation's geometry.
    corner = rgb.crop((0, 0, 48, 40))
    F.rotate(corner, 10.0, InterpolationMode.NEAREST).save(EXP / "rgb.jpg.corner.rot10n.png")
    meta = {
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "eval_size": EVAL_SIZE,
        "inputs": files,
    }
    (EXP / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    trivial_augment_fixtures()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(list(OUT.rglob('*')))} files, {total / 1024:.0f} KiB under {OUT}")


if __name__ == "__main__":
    main()
