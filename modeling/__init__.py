"""Models, configs, the image processor and the shared correspondence ops of semcorr.

Importing this module registers every semcorr config with ``AutoConfig``, ``AutoModel`` and
``AutoImageProcessor``, so ``AutoModel.from_pretrained(dir)`` works without remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .backbone import FeatureBackbone, load_backbone_weights
from .configuration_hyperpixel import HyperpixelFlowConfig
from .configuration_pmd import PMDConfig, PMDStudentConfig, PMDTeacherConfig
from .correlation import dense_cosine_correlation
from .default_model import default_config, default_model_dir, image_processor_for, load_default_model
from .embedded_backbone import EMBEDDED_BACKBONE, embedded_state_dict
from .geometry import cell_centers, grid_to_pixels, identity_grid, pixels_to_grid, sample_grid_at
from .image_io import load_image
from .image_processing_semcorr import SemanticCorrespondenceImageProcessor, validate_keypoints
from .keypoint_transfer import transfer_keypoints
from .matches import select_mutual_matches
from .modeling_hyperpixel import HyperpixelFlowModel, HyperpixelFlowPreTrainedModel
from .modeling_matcher import CorrespondenceOutput, SemanticMatcherPreTrainedModel
from .modeling_pmd import PMDOutput, PMDPreTrainedModel, PMDStudentModel, PMDTeacherModel
from .mutual_nn import mutual_nearest_neighbours
from .rhm import gaussian_kernel2d, regularized_hough_matching
from .soft_argmax import kernel_soft_argmax

_PROCESSORS = {"pil": SemanticCorrespondenceImageProcessor, "torchvision": SemanticCorrespondenceImageProcessor}
for _config, _model in (
    (HyperpixelFlowConfig, HyperpixelFlowModel),
    (PMDTeacherConfig, PMDTeacherModel),
    (PMDStudentConfig, PMDStudentModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoImageProcessor.register(_config, image_processor_classes=_PROCESSORS, exist_ok=True)

__all__ = [
    "CorrespondenceOutput",
    "EMBEDDED_BACKBONE",
    "FeatureBackbone",
    "HyperpixelFlowConfig",
    "HyperpixelFlowModel",
    "HyperpixelFlowPreTrainedModel",
    "PMDConfig",
    "PMDOutput",
    "PMDPreTrainedModel",
    "PMDStudentConfig",
    "PMDStudentModel",
    "PMDTeacherConfig",
    "PMDTeacherModel",
    "SemanticCorrespondenceImageProcessor",
    "SemanticMatcherPreTrainedModel",
    "cell_centers",
    "default_config",
    "default_model_dir",
    "dense_cosine_correlation",
    "embedded_state_dict",
    "gaussian_kernel2d",
    "grid_to_pixels",
    "identity_grid",
    "image_processor_for",
    "kernel_soft_argmax",
    "load_backbone_weights",
    "load_default_model",
    "load_image",
    "mutual_nearest_neighbours",
    "pixels_to_grid",
    "regularized_hough_matching",
    "sample_grid_at",
    "select_mutual_matches",
    "transfer_keypoints",
    "validate_keypoints",
]
