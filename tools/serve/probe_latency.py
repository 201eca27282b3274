"""Latency of GET /health/live while clients post large Open Inference Protocol JSON bodies
(3.1 MB of FP32 numbers, refused after parsing: their count does not match their shape, so
no inference runs) to a running vt-serve, 15 s (bench/RESULTS.md, session 31).

    python3 tools/serve/probe_latency.py BASE_URL MODEL_NAME POSTERS
"""
import json
import statistics
import sys
import threading
import time
import urllib.request

base, model, posters = sys.argv[1], sys.argv[2], int(sys.argv[3])
values = 200 * 3 * 32 * 32 + 1
body = json.dumps(
    {"inputs": [{"name": "image", "shape": [200, 3, 32, 32], "datatype": "FP32",
                 "data": [0.5] * values}]}
).encode()
stop = time.time() + 15


def post():
    while time.time() < stop:
        request = urllib.request.Request(f"{base}/v2/models/{model}/infer", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request).read()
        except urllib.error.HTTPError as refused:
            refused.read()


threads = [threading.Thread(target=post) for _ in range(posters)]
for thread in threads:
    thread.start()
latencies = []
while time.time() < stop:
    started = time.time()
    urllib.request.urlopen(f"{base}/health/live").read()
    latencies.append((time.time() - started) * 1000)
    time.sleep(0.02)
for thread in threads:
    thread.join()
latencies.sort()
print(f"{posters} posters of {len(body) / 1e6:.1f} MB: probe p50 "
      f"{statistics.median(latencies):.1f} ms, p90 {latencies[int(len(latencies) * 0.9)]:.1f} "
      f"ms, max {latencies[-1]:.1f} ms ({len(latencies)} probes)")
