"""workers: the model math (DeepSeek-V4 in pure torch), its KV pool, and the worker that owns a shard."""
