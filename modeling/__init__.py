"""Models, configs, the image processor and the shared correspondence ops of semcorr.

Layout (transformers-style):

* the matching contract every model implements (:mod:`.modeling_matcher`), the image processor
  (:mod:`.image_processing_semcorr`), image loading (:mod:`.image_io`), the backbones
  (:mod:`.backbone`, :mod:`.embedded_backbone`), the embedded default (:mod:`.default_model`) and
  :func:`~.loading.load_matcher` (a model id, folder, object or pipeline -> model and processor);
* :mod:`.ops` -- tensor operations shared by every model, one idea per file;
* one subpackage per model family -- :mod:`.hyperpixel`, :mod:`.pmd`, :mod:`.cascaded_mil` -- each with its
  configuration, modeling, layers, losses and converter.

Importing this module registers every semcorr config with ``AutoConfig``, ``AutoModel`` and
``AutoImageProcessor``, so ``AutoModel.from_pretrained(dir)`` works without remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .backbone import FeatureBackbone, load_backbone_weights
from .cascaded_mil import (
    CascadedMILConfig,
    CascadedMILModel,
    CascadedMILOutput,
    CascadedMILPreTrainedModel,
    CascadedMILStageConfig,
)
from .default_model import default_config, default_model_dir, load_default_model
from .embedded_backbone import EMBEDDED_BACKBONE, embedded_state_dict
from .hyperpixel import HyperpixelFlowConfig, HyperpixelFlowModel, HyperpixelFlowPreTrainedModel
from .image_io import load_image
from .image_processing_semcorr import (
    SemanticCorrespondenceImageProcessor,
    image_processor_for,
    pad_keypoints,
    validate_keypoints,
)
from .loading import load_matcher
from .modeling_matcher import CorrespondenceOutput, SemanticMatcherPreTrainedModel
from .ops import (
    cell_centers,
    dense_cosine_correlation,
    gaussian_kernel2d,
    grid_to_pixels,
    identity_grid,
    kernel_soft_argmax,
    pixels_to_grid,
    regularized_hough_matching,
    sample_grid_at,
    select_mutual_matches,
    transfer_keypoints,
)
from .pmd import (
    PMDConfig,
    PMDOutput,
    PMDPreTrainedModel,
    PMDStudentConfig,
    PMDStudentModel,
    PMDTeacherConfig,
    PMDTeacherModel,
)

_PROCESSORS = {"pil": SemanticCorrespondenceImageProcessor, "torchvision": SemanticCorrespondenceImageProcessor}
for _config, _model in (
    (HyperpixelFlowConfig, HyperpixelFlowModel),
    (PMDTeacherConfig, PMDTeacherModel),
    (PMDStudentConfig, PMDStudentModel),
    (CascadedMILConfig, CascadedMILModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoImageProcessor.register(_config, image_processor_classes=_PROCESSORS, exist_ok=True)

__all__ = [
    "CascadedMILConfig",
    "CascadedMILModel",
    "CascadedMILOutput",
    "CascadedMILPreTrainedModel",
    "CascadedMILStageConfig",
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
    "load_matcher",
    "pad_keypoints",
    "pixels_to_grid",
    "regularized_hough_matching",
    "sample_grid_at",
    "select_mutual_matches",
    "transfer_keypoints",
    "validate_keypoints",
]
