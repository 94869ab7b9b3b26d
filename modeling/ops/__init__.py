"""Tensor operations every semcorr model shares, one idea per file.

* :mod:`.geometry` -- the coordinate conventions: pixels <-> grid units, cell centres, dense-field sampling.
* :mod:`.correlation` -- dense cosine correlation between two feature maps.
* :mod:`.rhm` -- regularised Hough matching (Hyperpixel Flow), re-scoring matches by geometric consensus.
* :mod:`.soft_argmax` -- kernel soft-argmax (SFNet) and the local sub-cell refinement of an arg-max.
* :mod:`.fused_matching` -- correlation, RHM and arg-max refinement both ways over blocks, one volume held.
* :mod:`.keypoint_transfer` -- carrying points through a dense field.
* :mod:`.matches` -- sparse mutual matches from the two dense fields.
"""

from .correlation import dense_cosine_correlation
from .fused_matching import DenseFields, fused_hough_matching
from .geometry import (
    cell_axes,
    cell_centers,
    grid_axes,
    grid_to_pixels,
    identity_grid,
    pixels_to_grid,
    sample_grid_at,
)
from .keypoint_transfer import transfer_keypoints
from .matches import select_mutual_matches
from .rhm import gaussian_kernel2d, regularized_hough_matching
from .soft_argmax import kernel_soft_argmax, local_soft_argmax

__all__ = [
    "DenseFields",
    "cell_axes",
    "cell_centers",
    "dense_cosine_correlation",
    "fused_hough_matching",
    "gaussian_kernel2d",
    "grid_axes",
    "grid_to_pixels",
    "identity_grid",
    "kernel_soft_argmax",
    "local_soft_argmax",
    "pixels_to_grid",
    "regularized_hough_matching",
    "sample_grid_at",
    "select_mutual_matches",
    "transfer_keypoints",
]
