"""vt-serve through NVIDIA's own Open Inference Protocol client (tritonclient.http), as a
Triton or KServe user would call it.

  fixture OUT_DIR
      Writes the request bodies that tritonclient builds for two generated images, which
      vt-serve's tests replay (crates/vt-serve/tests/fixtures/tritonclient/):
      binary.bin  binary tensor data: input [2, 1] BYTES, `probabilities` as binary data,
                  `logits` as JSON classification strings (class_count 3), request id
      json.bin    the images base64-encoded in JSON, no outputs named (so tritonclient asks
                  for all of them as binary data)
      requests.json  each body's Inference-Header-Content-Length and tritonclient's version
      0.png, 1.jpg   the two images
  check HOST:PORT MODEL IMAGE...
      Against a running vt-serve: health, readiness, metadata, configuration, then inference of the images
      in one request (binary, JSON, and binary gzip-compressed both ways), each image's
      probabilities compared with what POST /predict answers for it alone, and an unknown
      model's error; then the same through the asyncio client (tritonclient.http.aio), which
      asks for gzip on every request. Prints a JSON summary.
      With --checkpoint DIR (the served checkpoint), the images also go preprocessed as FP32
      [N, 3, S, S] (the ONNX export's input) by this reference's `preprocess`, in binary and
      JSON, and with --grpc HOST:PORT through tritonclient.grpc too: their probabilities
      against POST /predict's, which differ only by PIL's resize against vt's.

Needs `pip install tritonclient[http] numpy pillow`.
"""

import argparse
import asyncio
import base64
import io
import json
import sys
import urllib.request
from importlib.metadata import version
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def generated_images():
    from PIL import Image

    x, y = np.meshgrid(np.arange(48), np.arange(40))
    first = np.stack([x * 5, y * 6, (x ^ y) * 7], axis=-1).astype(np.uint8)
    x, y = np.meshgrid(np.arange(64), np.arange(50))
    second = np.stack([255 - x * 3, (x + y) * 2, y * 5], axis=-1).astype(np.uint8)
    encoded = []
    for pixels, fmt in [(first, "PNG"), (second, "JPEG")]:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt)
        encoded.append(out.getvalue())
    return encoded


def image_input(images, binary, shape=None):
    tensor = httpclient.InferInput("image", shape or [len(images)], "BYTES")
    if binary:
        data = np.array(images, dtype=np.object_)
    else:
        # JSON carries strings: images go base64-encoded.
        data = np.array([base64.b64encode(b).decode() for b in images], dtype=np.object_)
    tensor.set_data_from_numpy(data.reshape(tensor.shape()), binary_data=binary)
    return tensor


def fixture(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    images = generated_images()
    (out_dir / "0.png").write_bytes(images[0])
    (out_dir / "1.jpg").write_bytes(images[1])
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [image_input(images, True, [2, 1])],
        outputs=[
            httpclient.InferRequestedOutput("probabilities", binary_data=True),
            httpclient.InferRequestedOutput("logits", binary_data=False, class_count=3),
        ],
        request_id="fixture-1",
    )
    (out_dir / "binary.bin").write_bytes(body)
    json_body, json_header_length = httpclient.InferenceServerClient.generate_request_body(
        [image_input(images, False)]
    )
    (out_dir / "json.bin").write_bytes(json_body)
    (out_dir / "requests.json").write_text(
        json.dumps(
            {
                "tritonclient": version("tritonclient"),
                "binary.bin": {"header_length": header_length},
                "json.bin": {"header_length": json_header_length},
            },
            indent=2,
        )
        + "\n"
    )


def predict_alone(url, image):
    request = urllib.request.Request(
        f"http://{url}/predict?top_k=1000",
        data=image,
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request) as response:
        return {p["label"]: p["score"] for p in json.load(response)["predictions"]}


async def check_asyncio(url, model, images, alone):
    """The asyncio client (aiohttp), which asks for gzip on every request: metadata, one
    inference of all the images and an unknown model's error."""
    import tritonclient.http.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    try:
        summary = {"model_name": (await client.get_model_metadata(model))["name"]}
        result = await client.infer(model, [image_input(images, True)])
        probs = result.as_numpy("probabilities")
        # Sorted probabilities, which the class order (not known here) cannot change.
        summary["max_abs_diff_vs_predict"] = max(
            float(abs(a - b))
            for i, expected in enumerate(alone)
            for a, b in zip(sorted(probs[i]), sorted(expected.values()))
        )
        try:
            await client.infer("no-such-model", [image_input(images[:1], True)])
            summary["unknown_model_error"] = None
        except InferenceServerException as e:
            summary["unknown_model_error"] = str(e)
        return summary
    finally:
        await client.close()


def check_preprocessed(url, grpc_url, model, checkpoint, paths, alone):
    """Images preprocessed by the reference, sent as FP32 [N, 3, S, S]; the worst
    difference of their sorted probabilities from POST /predict's, per way of sending."""
    from vt_resnet import preprocess

    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    pixels = np.stack([preprocess(p, cfg).numpy() for p in paths])

    def worst(probs):
        return max(
            float(abs(a - b))
            for i, expected in enumerate(alone)
            for a, b in zip(sorted(probs[i]), sorted(expected.values()))
        )

    summary = {"shape": list(pixels.shape)}
    client = httpclient.InferenceServerClient(url)
    for name, binary in [("binary", True), ("json", False)]:
        tensor = httpclient.InferInput("image", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(model, [tensor])
        summary[name] = worst(result.as_numpy("probabilities"))
    if grpc_url:
        import tritonclient.grpc as grpcclient

        tensor = grpcclient.InferInput("image", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        result = grpcclient.InferenceServerClient(grpc_url).infer(model, [tensor])
        summary["grpc"] = worst(result.as_numpy("probabilities"))
    return summary


def check(url, model, paths, checkpoint=None, grpc_url=None):
    client = httpclient.InferenceServerClient(url)
    summary = {"tritonclient": version("tritonclient")}
    summary["live"] = client.is_server_live()
    summary["ready"] = client.is_server_ready()
    summary["model_ready"] = client.is_model_ready(model)
    metadata = client.get_model_metadata(model)
    summary["metadata"] = metadata
    classes = metadata["outputs"][0]["shape"][1]
    config = client.get_model_config(model)
    summary["config"] = config
    images = [Path(p).read_bytes() for p in paths]
    alone = [predict_alone(url, image) for image in images]
    # Binary and JSON data; then binary again, gzip-compressed both ways.
    for name, binary, compression in [
        ("binary", True, None),
        ("json", False, None),
        ("binary_gzip", True, "gzip"),
    ]:
        result = client.infer(
            model,
            [image_input(images, binary)],
            outputs=[
                httpclient.InferRequestedOutput("probabilities", binary_data=binary),
                httpclient.InferRequestedOutput(
                    "logits", binary_data=binary, class_count=classes
                ),
            ],
            request_id="check",
            request_compression_algorithm=compression,
            response_compression_algorithm=compression,
        )
        probs = result.as_numpy("probabilities")
        ranked = result.as_numpy("logits")
        worst = 0.0
        for i, expected in enumerate(alone):
            # Class names in the model's output order, from the classification strings.
            labels = {}
            for entry in ranked[i]:
                text = entry.decode() if isinstance(entry, bytes) else entry
                _, index, label = text.split(":", 2)
                labels[int(index)] = label
            for index, label in labels.items():
                worst = max(worst, abs(float(probs[i][index]) - expected[label]))
        summary[name] = {
            "images": len(images),
            "probabilities_shape": list(probs.shape),
            "classification_shape": list(ranked.shape),
            "first_classification": [
                e.decode() if isinstance(e, bytes) else e for e in ranked[0]
            ],
            "id": result.get_response().get("id"),
            "model_version": result.get_response().get("model_version"),
            "max_abs_diff_vs_predict": worst,
        }
    try:
        client.infer("no-such-model", [image_input(images[:1], True)])
        summary["unknown_model_error"] = None
    except InferenceServerException as e:
        summary["unknown_model_error"] = str(e)
    summary["asyncio"] = asyncio.run(check_asyncio(url, model, images, alone))
    if checkpoint:
        summary["preprocessed"] = check_preprocessed(
            url, grpc_url, model, checkpoint, paths, alone
        )
    print(json.dumps(summary, indent=2))
    ok = (
        summary["live"]
        and summary["ready"]
        and summary["model_ready"]
        and config["input"][0]["name"] == metadata["inputs"][0]["name"]
        and [o["dims"] for o in config["output"]] == [o["shape"][1:] for o in metadata["outputs"]]
        and summary["unknown_model_error"]
        and all(summary[k]["max_abs_diff_vs_predict"] < 1e-5 for k in ["binary", "json", "binary_gzip"])
        and summary["asyncio"]["unknown_model_error"]
        and summary["asyncio"]["max_abs_diff_vs_predict"] < 1e-5
        # PIL's resize and vt's differ by a grey level here and there.
        and all(v < 1e-2 for k, v in summary.get("preprocessed", {}).items() if k != "shape")
    )
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fix = sub.add_parser("fixture")
    fix.add_argument("out_dir", type=Path)
    chk = sub.add_parser("check")
    chk.add_argument("url", help="HOST:PORT of a running vt-serve")
    chk.add_argument("model")
    chk.add_argument("images", nargs="+")
    chk.add_argument("--checkpoint", help="the served checkpoint: also send preprocessed FP32")
    chk.add_argument("--grpc", help="HOST:PORT of its gRPC port, for the preprocessed images")
    args = parser.parse_args()
    if args.command == "fixture":
        fixture(args.out_dir)
        return 0
    return check(args.url, args.model, args.images, args.checkpoint, args.grpc)


if __name__ == "__main__":
    sys.exit(main())
