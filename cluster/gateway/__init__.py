"""The gateway: the `dsv4.v1.Inference` gRPC API over an engine or the pool router.

`core.py` admits requests and streams outputs (transport-free); one module per RPC
family (`chat.py`: Chat, Encode; `generate.py`: Generate; `info.py`: Abort, model and
server info, Drain); `server.py` the grpc.aio server; `metrics.py` Prometheus;
`client.py` the client behind `dsv4 chat`.
"""
