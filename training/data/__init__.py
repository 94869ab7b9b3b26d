"""Training data: synthetic warps with known correspondence, unlabelled image sources, keypoint batches."""
