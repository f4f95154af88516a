"""Ray Tune sweeps over the training job (see issue 4)."""
