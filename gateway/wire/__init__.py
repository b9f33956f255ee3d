"""The OpenAI wire schema and its validation (below the pipeline: the API layer and the workers share it)."""
