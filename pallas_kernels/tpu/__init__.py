"""TPU backend: Pallas Mosaic TPU."""
