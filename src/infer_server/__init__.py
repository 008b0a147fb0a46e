"""The inference server, one package per process that runs it (docs/architecture.md).

* ``front/``: the server's main process, on one asyncio loop — gRPC (``service``, ``session``),
  the server's lifecycle (``server``), the tmpfs handoff, the batch registry and its cursors,
  errors, metrics.
* ``supervisor/``: the same process, the pool's side of the workers — spawning, credit, deaths and
  retries (``pool``), exactly-once bookkeeping (``ledger``), the pipes (``channels``).
* ``relay/``: each gRPC front process (``--fronts``) — it serves the port and relays every call to
  the main process (``front/relayed.py`` runs them there).
* ``stage/``: each stage worker process — its loop (``worker``), the vision pipeline,
  pre/post-processing, the model repository and the inference ``backends`` (ONNX Runtime, TensorRT).

``messages`` holds everything that crosses a process boundary; ``settings`` every knob, and ``cli``
the command that starts it all.
"""
