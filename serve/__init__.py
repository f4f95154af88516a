"""Ray Serve application: the base model and its adapters behind an OpenAI-compatible API."""
