"""lorafleet jobs: config schema, data, model loading, the Ray Train job and the CLI."""
