"""Load generation against a running k2serve router (network clients only: no torch, no router code).

``bench_serve.run_sweep`` is the ``k2serve bench serve`` runner (vLLM ``bench serve`` metrics over
the ``random``, ``sharegpt`` and ``agentic`` datasets, REST or gRPC, results in ``report`` and
``plots``); ``locustfile_openai.py`` and ``locustfile_grpc.py`` are locust users for the same APIs.
"""
