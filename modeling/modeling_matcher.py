"""The one matching contract every semcorr model implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class CorrespondenceOutput(ModelOutput):
    """What ``match()`` returns.

    Args:
        grid_src_to_trg: ``(B, 2, h, w)`` where each source feature cell lands in the target,
            normalised grid units (``align_corners=False``).
        confidence: ``(B, h, w)`` per-source-cell confidence in ``[0, 1]``: absolute, so that it can be
            compared across pairs and thresholded (Hyperpixel Flow: the geometric mean of the matched
            features' cosine and the share of the cell's scores near its match; PMD: the peak of the cell's
            L2-normalised correlation row, 1 when it is all at one target; cascaded MIL: the best refined cosine). Never normalised by the pair.
        grid_trg_to_src: ``(B, 2, h_t, w_t)`` the reverse field, when the model computes it
            (used for mutual matches).
        target_keypoints: ``(B, N, 2)`` transferred keypoints in model-input pixels of the target.
        keypoint_scores: ``(B, N)`` confidence of each transferred keypoint in ``[0, 1]``.
        loss: training loss, when ``forward`` computes one.
        transfer_weights: ``(B, h, w)`` how much each source cell counts when keypoints are carried
            through ``grid_src_to_trg`` (:func:`~semcorr.modeling.ops.transfer_keypoints`), when the model
            weighs them otherwise than by ``confidence`` (Hyperpixel Flow: the cell's best score over the
            pair's best, with which its default was chosen).
    """

    grid_src_to_trg: torch.FloatTensor | None = None
    confidence: torch.FloatTensor | None = None
    grid_trg_to_src: torch.FloatTensor | None = None
    target_keypoints: torch.FloatTensor | None = None
    keypoint_scores: torch.FloatTensor | None = None
    loss: torch.FloatTensor | None = None
    transfer_weights: torch.FloatTensor | None = None


class SemanticMatcherPreTrainedModel(PreTrainedModel):
    """Base class of all semcorr matchers.

    Subclasses implement ``match(source_pixel_values, target_pixel_values, source_keypoints=None)
    -> CorrespondenceOutput`` (keypoints as ``(B, N, 2)`` model-input pixels) and ``forward()``
    for training. Backbone modules (flagged by :class:`~semcorr.modeling.backbone.FeatureBackbone`)
    keep their own weights: ``post_init`` never re-initialises them.
    """

    base_model_prefix = "matcher"
    main_input_name = "source_pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Intermediate bases (``*PreTrainedModel``) may leave match() to their subclasses.
        if not cls.__name__.endswith("PreTrainedModel") and not callable(getattr(cls, "match", None)):
            raise TypeError(f"{cls.__name__} must implement match(source_pixel_values, target_pixel_values, ...)")

    def supervised_keypoint_loss(self, source_pixel_values, target_pixel_values, source_keypoints, target_keypoints,
                                 keypoint_mask=None):
        """The loss of labelled keypoint pairs ``(B, N, 2)`` (model pixels; ``keypoint_mask (B, N)`` marks real
        ones) for keypoint fine-tuning. Trainable models override it; a training-free matcher has none."""
        raise TypeError(f"{type(self).__name__} has no keypoint loss: it is not trainable with keypoints "
                        "(fine-tune a PMD student / teacher or a cascaded MIL generator)")

    def _init_weights(self, module):
        if getattr(module, "_semcorr_backbone", False):
            return
        super()._init_weights(module)
