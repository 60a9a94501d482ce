"""The worker: a Celery process that keeps one GGUF resident and embeds shards."""
