"""Calls that meet a gRPC connection's idle close: 600 `ServerLive` calls through grpcio
(gRPC's C core, which tritonclient.grpc uses), each sent 38-42 ms after the previous
answer, to a vt-serve started with `--header-timeout-ms 40`, so that most calls are sent
as the server closes the connection for idleness. Prints the calls that failed
(bench/RESULTS.md, session 32). Needs `pip install grpcio`.

    vt-serve --checkpoint CK --grpc-port PORT --header-timeout-ms 40 &
    python3 tools/serve/grpc_idle_race.py PORT
"""
import sys
import time

import grpc

port = sys.argv[1]
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
# An empty ServerLiveRequest is zero bytes: no generated code is needed.
live = channel.unary_unary(
    "/inference.GRPCInferenceService/ServerLive",
    request_serializer=lambda request: request,
    response_deserializer=lambda response: response,
)
failed = []
for i in range(600):
    try:
        live(b"", timeout=5)
    except grpc.RpcError as error:
        failed.append(f"{error.code().name}: {error.details()}")
    time.sleep((38_000 + (i * 7919) % 4000) / 1e6)
print(f"{len(failed)} of 600 calls failed", *sorted(set(failed)), sep="\n  ")
