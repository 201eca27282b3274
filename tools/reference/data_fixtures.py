"""Reference outputs of PIL/torchvision for vt-data's transform tests.

Writes small generated images (one per colour type the loader must handle) into
crates/vt-data/tests/fixtures/ and, under expected/, what torchvision makes of them:
the evaluation transform (Resize(round(S*256/224)) + CenterCrop(S), S=64), a fixed
resized crop, and a rotation. The expected images are PNG, i.e. exactly the uint8 pixels
torchvision hands to ToTensor, so the Rust tests compare after normalising both sides.

Run: /root/.cache/vt/torch-venv/bin/python tools/reference/data_fixtures.py
"""

import json
import pathlib

import numpy as np
import PIL
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision import transforms

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "vt-data" / "tests" / "fixtures"
EXP = OUT / "expected"
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


def main():
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
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(list(OUT.rglob('*')))} files, {total / 1024:.0f} KiB under {OUT}")


if __name__ == "__main__":
    main()
