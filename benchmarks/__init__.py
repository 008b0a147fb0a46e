"""The fps benchmark of the inference server (``python -m benchmarks.fps``) and its baselines.

Never imported by ``src/`` or the tests: it drives the real server as a user would, in subprocesses.
See ``benchmarks/README.md``.
"""
