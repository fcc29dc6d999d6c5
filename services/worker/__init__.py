"""worker: one per GPU; pulls from its virtual queue, runs an engine, streams tokens,
reports events and telemetry, obeys LSO commands (``python -m services.worker``)."""
