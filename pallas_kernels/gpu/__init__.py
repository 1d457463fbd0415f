"""GPU backends: Pallas Triton (any CUDA GPU) and Pallas Mosaic GPU (Hopper)."""
