"""The qlm services: ingest, estimator, scheduler, worker (one package each)."""
