"""Scale-out on Ray: ``adafocus batch`` over a corpus with Ray Data, ``adafocus serve`` with Ray Serve.

Nothing here imports ray at module level: the ``ray`` extra is needed only when a command runs on Ray.
"""
