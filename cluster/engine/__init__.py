"""The engine: one loop thread per instance that schedules steps on its worker group
(`engine.py`): continuous batching, chunked prefill and KV page accounting
(`scheduler.py`), the prefix cache (`prefix_cache.py`), detokenization with stop strings
(`textstream.py`), and the pool router that places requests over a pool's instances and
hands prefilled requests from prefill to decode instances (`pool_router.py`).
"""
