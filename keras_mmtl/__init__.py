"""keras_mmtl."""
