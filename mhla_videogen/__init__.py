"""MHLA text-to-video (to come): Wan2.1 with MHLA attention as a diffusers attention processor, weight
conversion, released-checkpoint loading, training and generation."""
