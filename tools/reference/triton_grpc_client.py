"""vt-serve's gRPC port through NVIDIA's own Open Inference Protocol client
(tritonclient.grpc), as a Triton or KServe user would call it.

  fixture DIR
      Writes DIR/grpc_infer.bin: the ModelInferRequest protocol buffer that tritonclient
      builds for DIR/0.png and DIR/1.jpg (the images of the HTTP fixture), which vt-serve's
      tests replay (tests/grpc.rs): model `tiny`, input `image` BYTES [2] in
      raw_input_contents, outputs `probabilities` and `logits` with class_count 3, request
      id `fixture-grpc-1`. Prints tritonclient's version, for the README.
  check HOST:PORT MODEL PREDICTIONS.jsonl
      Against a running vt-serve's gRPC port (`--grpc-port`): health, readiness, server and
      model metadata, then inference of the images that PREDICTIONS.jsonl names in one
      request (outputs `probabilities` and `logits` with class_count 3), again
      gzip-compressed, and through the asyncio client, the probabilities compared with the
      file's (`vt-serve predict --checkpoint CKPT IMAGE... > PREDICTIONS.jsonl`, the offline
      predictions); an unknown model's error and a bad image's. Prints a JSON summary; exits
      non-zero when a check fails.

Needs `pip install tritonclient[grpc] numpy`.
"""

import argparse
import asyncio
import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException


def inputs_and_outputs(images, class_count):
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    outputs = [
        grpcclient.InferRequestedOutput("probabilities"),
        grpcclient.InferRequestedOutput("logits", class_count=class_count),
    ]
    return [tensor], outputs


def fixture(out_dir):
    images = [(out_dir / name).read_bytes() for name in ["0.png", "1.jpg"]]
    inputs, outputs = inputs_and_outputs(images, 3)
    # What InferenceServerClient.infer sends, built by the same helper.
    request = _get_inference_request(
        model_name="tiny",
        inputs=inputs,
        model_version="",
        request_id="fixture-grpc-1",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    (out_dir / "grpc_infer.bin").write_bytes(request.SerializeToString())
    print(f"tritonclient {version('tritonclient')}")


def compare(result, offline):
    """The largest difference between an answer's probabilities and the offline ones, and
    the shapes and first strings of its classification output."""
    probs = result.as_numpy("probabilities")
    ranked = result.as_numpy("logits")
    worst = float(np.abs(probs - np.array(offline, dtype=np.float32)).max())
    return {
        "probabilities_shape": list(probs.shape),
        "classification_shape": list(ranked.shape),
        "first_classification": [e.decode() for e in ranked[0]],
        "max_abs_diff_vs_offline": worst,
    }


async def check_asyncio(grpc_url, model, images, offline):
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(grpc_url)
    try:
        inputs, outputs = inputs_and_outputs(images, 3)
        result = await client.infer(model, inputs, outputs=outputs)
        return {
            "ready": await client.is_server_ready(),
            **compare(result, offline),
        }
    finally:
        await client.close()


def error_of(call):
    try:
        call()
        return None
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}


def check(grpc_url, model, predictions):
    client = grpcclient.InferenceServerClient(grpc_url)
    summary = {
        "tritonclient": version("tritonclient"),
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "other_model_ready": client.is_model_ready("no-such-model"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
    }
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    images = [Path(line["image"]).read_bytes() for line in lines]
    offline = [line["probs"] for line in lines]
    for name, compression in [("infer", None), ("infer_gzip", "gzip")]:
        inputs, outputs = inputs_and_outputs(images, 3)
        result = client.infer(
            model,
            inputs,
            outputs=outputs,
            request_id="check",
            compression_algorithm=compression,
        )
        response = result.get_response()
        summary[name] = {
            "id": response.id,
            "model_version": response.model_version,
            **compare(result, offline),
        }
    summary["asyncio"] = asyncio.run(check_asyncio(grpc_url, model, images, offline))
    inputs, _ = inputs_and_outputs(images[:1], 3)
    summary["unknown_model_error"] = error_of(lambda: client.infer("no-such-model", inputs))
    summary["not_an_image_error"] = error_of(
        lambda: client.infer(model, inputs_and_outputs([b"hello"], 3)[0])
    )
    client.close()
    print(json.dumps(summary, indent=2))
    results = [summary["infer"], summary["infer_gzip"], summary["asyncio"]]
    ok = (
        summary["live"]
        and summary["ready"]
        and summary["model_ready"]
        and not summary["other_model_ready"]
        and summary["model_metadata"]["name"] == model
        and all(r["max_abs_diff_vs_offline"] < 1e-5 for r in results)
        and all(r["classification_shape"] == [len(images), 3] for r in results)
        and summary["infer"]["id"] == "check"
        and summary["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
        and summary["not_an_image_error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    )
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)
    write = commands.add_parser("fixture", help="write grpc_infer.bin into DIR")
    write.add_argument("out_dir", type=Path)
    write.set_defaults(run=lambda args: fixture(args.out_dir) or 0)
    run = commands.add_parser("check", help="check a running server")
    run.add_argument("grpc_url", help="HOST:PORT of a running vt-serve's gRPC port")
    run.add_argument("model", help="the model's name")
    run.add_argument("predictions", type=Path, help="`vt-serve predict` output")
    run.set_defaults(run=lambda args: check(args.grpc_url, args.model, args.predictions))
    args = parser.parse_args()
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
