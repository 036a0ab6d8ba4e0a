"""``convnext serve``: a resident process that keeps models loaded, and the light client that
classify and embed use to reach it.

- :mod:`~convnext_cli.serve.paths`: where the socket lives (the user's runtime folder).
- :mod:`~convnext_cli.serve.protocol`: the frames and messages on the socket, with their bounds.
- :mod:`~convnext_cli.serve.client`: connecting, and a stand-in for the engine's runner that
  sends the inputs to the server (no torch import).
- :mod:`~convnext_cli.serve.server`: the server itself, running the engine's own
  :class:`~convnext_cli.engine.task.Task` on the engine's own runners.
"""
