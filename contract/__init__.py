"""The job contract shared by producer and worker: job spec, shard message, Arrow schemas, key
layout, settings, storage and errors. Producer and worker import this package, never each other."""
