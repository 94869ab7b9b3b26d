"""Hyperpixel Flow (Min et al., ICCV 2019): the training-free matcher and semcorr's embedded default."""

from .configuration_hyperpixel import HyperpixelFlowConfig
from .modeling_hyperpixel import HyperpixelFlowModel, HyperpixelFlowPreTrainedModel

__all__ = ["HyperpixelFlowConfig", "HyperpixelFlowModel", "HyperpixelFlowPreTrainedModel"]
