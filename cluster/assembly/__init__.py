"""The assembly: the manifest (`manifest.py`, YAML -> frozen dataclasses) and what turns
it into running pieces (`build.py`: engines per pool on their backend, the pool router,
the serving info), with preset checkpoints made on first use (`model_cache.py`)."""
