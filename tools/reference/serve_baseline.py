#!/usr/bin/env python3
"""A plain PyTorch serving baseline for `cargo xtask bench serve`.

    python tools/reference/serve_baseline.py --checkpoint DIR [--port 0] [--threads N]

The usual first deployment of a PyTorch classifier: the standard library's threaded HTTP
server, PyTorch eager, one image per forward pass (no batching; a lock runs one forward
pass at a time, as a single model instance must), the same checkpoint (config.json +
model.safetensors) and the contract's preprocessing through PIL.

POST /predict (raw image body, ?top_k=N) answers like vt-serve:
{"predictions": [{"label", "score"}...], "model", "elapsed_ms"}, scores from
torch.softmax (max-subtracted, so it never overflows). GET /ping answers 200.
Prints `listening on http://HOST:PORT` once ready.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vt_resnet as vt  # noqa: E402

MAX_BODY = 10 * 1024 * 1024


def make_handler(model, cfg: dict, name: str):
    lock = threading.Lock()
    classes = cfg["class_names"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle's algorithm on, the body waits
        # for the client's delayed ACK (~40 ms) on every keep-alive request.
        disable_nagle_algorithm = True

        def log_message(self, *args):  # one line per request would dominate the timing
            pass

        def send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if urlparse(self.path).path == "/ping":
                self.send_json(200, {"status": "ready"})
            else:
                self.send_json(404, {"error": "not_found", "detail": self.path})

        def do_POST(self):
            started = time.perf_counter()
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if url.path not in ("/predict", "/invocations"):
                self.rfile.read(length)
                return self.send_json(404, {"error": "not_found", "detail": url.path})
            if length > MAX_BODY:
                self.close_connection = True
                return self.send_json(413, {"error": "payload_too_large", "detail": str(length)})
            body = self.rfile.read(length)
            top_k = int(parse_qs(url.query).get("top_k", ["3"])[0])
            try:
                x = vt.preprocess(Image.open(io.BytesIO(body)), cfg).unsqueeze(0)
            except Exception as e:  # PIL raises several types for bad images
                return self.send_json(400, {"error": "invalid_image", "detail": str(e)})
            with lock, torch.inference_mode():
                probs = torch.softmax(model(x)[0], dim=0)
            scores, indices = torch.topk(probs, min(top_k, len(classes)))
            predictions = [{"label": classes[i], "score": float(s)}
                           for s, i in zip(scores.tolist(), indices.tolist())]
            self.send_json(200, {"predictions": predictions, "model": name,
                                 "elapsed_ms": (time.perf_counter() - started) * 1e3})

    return Handler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: PyTorch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = vt.load_checkpoint(args.checkpoint)
    name = os.path.basename(os.path.normpath(args.checkpoint))
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model, model.cfg, name))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
