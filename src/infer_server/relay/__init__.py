"""The gRPC front processes (``--fronts N``): each speaks gRPC to clients and relays every call to
the main process, which runs it (docs/front-scaling.md).

* ``process``: one front process — a grpc.aio server on the server's port (``SO_REUSEPORT``: the
  kernel spreads connections over the front processes) whose only handler forwards every call, as
  raw message bytes, over its link.
* ``link``: the framing both ends speak over one socket pair per front process: calls multiplexed
  by id, each with its own credit for requests (``WANT``) and its acknowledged responses (``ACK``).

What a front process never holds: identities, batches, files, the pool. Those stay in the main
process (``front/relayed.py`` runs the relayed calls against the same servicers a gRPC server in
the main process would), so exactly once, idempotency, admission, health and drain are decided in
one place however many front processes there are.
"""
