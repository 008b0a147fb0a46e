"""``python -m infer_server``: the same as the ``infer-server`` console script."""

from infer_server.cli import app

app(prog_name="infer-server")
