"""Ray Tune sweeps over the training job: `lorafleet sweep` / `python -m tune`."""
