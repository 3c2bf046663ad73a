"""A minimal gRPC client of `msjax.v1.Decode` that streams the text of one prompt:

    python -m serving.client --address 127.0.0.1:50051 "Beautiful is better than" --max-tokens 32

From Python:

    import grpc
    from serving.proto.msjax.v1 import decode_pb2, decode_pb2_grpc
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel("127.0.0.1:50051"))
    for r in stub.Generate(decode_pb2.GenerateRequest(prompt="Beautiful is", max_tokens=16), timeout=30):
        print(r.text, end="")
"""

from __future__ import annotations

import argparse
import sys

import grpc

from serving.proto.msjax.v1 import decode_pb2, decode_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="the call's deadline in seconds")
    parser.add_argument("--token", help="bearer token, when the server has an api_token")
    parser.add_argument("--tls-ca", help="PEM root certificate, when the server uses TLS")
    args = parser.parse_args(argv)
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    stub = decode_pb2_grpc.DecodeStub(channel)
    request = decode_pb2.GenerateRequest(prompt=args.prompt, max_tokens=args.max_tokens,
                                         temperature=args.temperature)
    started = False  # the prompt is echoed with the first response: on an error stdout stays empty
    try:
        for response in stub.Generate(request, timeout=args.timeout, metadata=metadata):
            if not started:
                print(args.prompt, end="", flush=True)
                started = True
            print(response.text, end="", flush=True)
            if response.finish_reason:
                print(f"\n[{response.usage.completion_tokens} tokens, {response.finish_reason}]", file=sys.stderr)
    except grpc.RpcError as err:
        if started:
            print(flush=True)  # end the partial line of text
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
