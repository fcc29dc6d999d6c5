"""The OpenAI-compatible HTTP front door of ingest: chat, completions, models, files, batches."""
