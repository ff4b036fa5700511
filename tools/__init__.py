"""Tools around the library, not part of it: benchmarks (``python -m tools.bench``), demo and photo data
assembly (``python -m tools.demo_data``, ``python -m tools.photos_data``) and the method comparison
(``python -m tools.compare_methods``). They may import ``pipeline`` and ``stages``; nothing imports them
except tests that reuse a generator."""
