"""patchbay's benchmarks, importable as ``patchbay_bench``.

- :mod:`patchbay_bench.client`: the ``patchbay-bench`` load-testing client (like ``vllm bench serve``);
- :mod:`patchbay_bench.serveproc`: start a real ``serve`` process, wait for ``/health``, stop it;
- the scripts (``core_bench.py``, ``embed_bench.py``, ...) run from a checkout as
  ``.venv/bin/python benchmarks/<script>.py``; docs/benchmarks.md says what each measures.
"""
