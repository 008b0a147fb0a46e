"""The inference server: gRPC front (``service``), tmpfs handoff, batch registry and stage workers.

Processes: the main process runs ``cli`` -> ``service`` (asyncio, gRPC) and ``pool`` (supervisor
threads); stage worker processes run ``worker`` (preprocess -> engines -> postprocess). What
crosses between them is defined in ``messages``.
"""
