"""A real gRPC server and client (Python grpcio, the C-core implementation) for switchyard's tests.

Messages are raw bytes (no protobuf code generation): generic handlers and
`channel.unary_unary(...)` with identity serializers.

Server: python3 grpc_peer.py serve NAME PORT
  test.Echo/Unary          answers NAME + ":" + request
  test.Echo/ServerStream   request = decimal N: answers N messages "NAME:i"
  test.Echo/ClientStream   answers "NAME:<count>:<total bytes>"
  test.Echo/Bidi           echoes every message as "NAME:" + message
  test.Echo/Fail           aborts with INVALID_ARGUMENT "bad input", trailer x-why: testing
  test.Echo/Sleep          request = milliseconds: sleeps, then answers
  test.Echo/Big            request = decimal N: answers N bytes
  test.Echo/Slow           request = N: streams N messages, one every 100 ms (stops when the
                           call is cancelled, and counts it)
  test.Control/SetServing  request "0" / "1": health status of "" and "test.Echo"
  test.Control/Cancelled   answers how many Slow calls were cancelled (decimal)
  grpc.health.v1.Health    from grpcio-health-checking
Prints "ready" once listening.

Client: python3 grpc_peer.py call TARGET AUTHORITY SCENARIO [ARG [CA_FILE]]; prints one JSON line.
With CA_FILE the channel is TLS, trusting that CA, and AUTHORITY is also the TLS server name.
"""

import json
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

MAX = 16 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX),
    ("grpc.max_receive_message_length", MAX),
]


def serve(name, port):
    prefix = name.encode() + b":"
    servicer = health.HealthServicer()
    cancelled = []

    def unary(req, ctx):
        return prefix + req

    def server_stream(req, ctx):
        for i in range(int(req)):
            yield prefix + str(i).encode()

    def client_stream(it, ctx):
        count = total = 0
        for m in it:
            count += 1
            total += len(m)
        return prefix + f"{count}:{total}".encode()

    def bidi(it, ctx):
        for m in it:
            yield prefix + m

    def fail(req, ctx):
        ctx.set_trailing_metadata((("x-why", "testing"),))
        ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")

    def sleep(req, ctx):
        time.sleep(int(req) / 1000.0)
        return prefix + b"slept"

    def big(req, ctx):
        return b"x" * int(req)

    def slow(req, ctx):
        for i in range(int(req)):
            yield prefix + str(i).encode()
            time.sleep(0.1)
            if not ctx.is_active():
                cancelled.append(1)
                return

    def count_cancelled(req, ctx):
        return str(len(cancelled)).encode()

    def set_serving(req, ctx):
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if req == b"1"
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        servicer.set("", status)
        servicer.set("test.Echo", status)
        return b"ok"

    h = grpc
    echo = h.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": h.unary_unary_rpc_method_handler(unary),
            "ServerStream": h.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": h.stream_unary_rpc_method_handler(client_stream),
            "Bidi": h.stream_stream_rpc_method_handler(bidi),
            "Fail": h.unary_unary_rpc_method_handler(fail),
            "Sleep": h.unary_unary_rpc_method_handler(sleep),
            "Big": h.unary_unary_rpc_method_handler(big),
            "Slow": h.unary_stream_rpc_method_handler(slow),
        },
    )
    control = h.method_handlers_generic_handler(
        "test.Control",
        {
            "SetServing": h.unary_unary_rpc_method_handler(set_serving),
            "Cancelled": h.unary_unary_rpc_method_handler(count_cancelled),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((echo, control))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def ident(x):
    return x


def call(target, authority, scenario, arg, ca_file=None):
    options = list(OPTIONS)
    if authority:
        options.append(("grpc.default_authority", authority))
    if ca_file:
        with open(ca_file, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", authority))
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    grpc.channel_ready_future(channel).result(timeout=10)

    def method(kind, path):
        return getattr(channel, kind)(path, request_serializer=ident, response_deserializer=ident)

    out = {}
    try:
        if scenario == "unary":
            out["reply"] = method("unary_unary", "/test.Echo/Unary")(arg.encode(), timeout=10).decode()
        elif scenario == "spread":
            # N unary calls over this one channel (one HTTP/2 connection)
            unary = method("unary_unary", "/test.Echo/Unary")
            out["replies"] = [unary(b"x", timeout=10).decode() for _ in range(int(arg))]
        elif scenario == "server_stream":
            it = method("unary_stream", "/test.Echo/ServerStream")(arg.encode(), timeout=10)
            out["replies"] = [m.decode() for m in it]
        elif scenario == "client_stream":
            msgs = (b"m" * (i + 1) for i in range(int(arg)))
            out["reply"] = method("stream_unary", "/test.Echo/ClientStream")(msgs, timeout=10).decode()
        elif scenario == "bidi":
            msgs = (str(i).encode() for i in range(int(arg)))
            it = method("stream_stream", "/test.Echo/Bidi")(msgs, timeout=10)
            out["replies"] = [m.decode() for m in it]
        elif scenario == "fail":
            method("unary_unary", "/test.Echo/Fail")(b"", timeout=10)
        elif scenario == "deadline":
            method("unary_unary", "/test.Echo/Sleep")(b"2000", timeout=float(arg))
        elif scenario == "big":
            reply = method("unary_unary", "/test.Echo/Big")(arg.encode(), timeout=20)
            out["len"] = len(reply)
        elif scenario == "big_upload":
            reply = method("stream_unary", "/test.Echo/ClientStream")(iter([b"u" * int(arg)]), timeout=20)
            out["reply"] = reply.decode()
        elif scenario == "slow":
            # streams until the instance dies: how far it got and how long the failure took
            it = method("unary_stream", "/test.Echo/Slow")(arg.encode(), timeout=30)
            out["replies"] = []
            start = time.time()
            try:
                for m in it:
                    out["replies"].append(m.decode())
                    print(json.dumps({"progress": len(out["replies"]), "last": out["replies"][-1]}), flush=True)
                    start = time.time()
            finally:
                out["failed_after_s"] = time.time() - start
        elif scenario == "cancel":
            # two messages of a long stream, then the client cancels (RST_STREAM)
            it = method("unary_stream", "/test.Echo/Slow")(b"100", timeout=30)
            out["replies"] = [next(it).decode(), next(it).decode()]
            it.cancel()
            # keep the connection: the cancellation travels as RST_STREAM, not as a closed socket
            time.sleep(0.5)
        elif scenario == "cancelled":
            out["reply"] = method("unary_unary", "/test.Control/Cancelled")(b"", timeout=10).decode()
        elif scenario == "set_serving":
            out["reply"] = method("unary_unary", "/test.Control/SetServing")(arg.encode(), timeout=10).decode()
        elif scenario == "health":
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=arg), timeout=10)
            out["status"] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        elif scenario == "method":
            # any unary method path, e.g. one no route knows
            out["reply"] = method("unary_unary", arg)(b"", timeout=10).decode()
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        out["code"] = "OK"
    except grpc.RpcError as e:
        out["code"] = e.code().name
        out["details"] = e.details()
        out["trailers"] = {k: v for k, v in (e.trailing_metadata() or ())}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        call(
            sys.argv[2],
            sys.argv[3],
            sys.argv[4],
            sys.argv[5] if len(sys.argv) > 5 else "",
            sys.argv[6] if len(sys.argv) > 6 else None,
        )
