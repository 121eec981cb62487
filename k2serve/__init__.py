"""k2serve: distributed serving for Kimi K2 Thinking.

The top-level package holds only entry points (the ``k2serve`` command and the small programs it
composes); the system lives in the subpackages ``k2serve.workers``, ``k2serve.router``,
``k2serve.cluster``, ``k2serve.kernels``, ``k2serve.proto`` and ``k2serve.loadtest``.
"""

__version__ = "0.1.0"
