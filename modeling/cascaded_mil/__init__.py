"""The cascaded MIL pseudo-label generator (Huang et al., *Weakly Supervised Learning of Semantic
Correspondence through Cascaded Online Correspondence Refinement*, ICCV 2023).

* :mod:`.configuration_cascaded_mil` -- the config, with one sub-config per stage.
* :mod:`.modeling_cascaded_mil` -- the cascade (image -> region -> pixel), its losses, ``match()``
  and ``pseudo_label()``.
* :mod:`.gated_attention` -- gated cross attention and the matching volume aggregation module (MVAM).
* :mod:`.volume_attention` -- 4D (shifted) window attention over a correlation volume, following VAT.
* :mod:`.pmps` -- pseudo matching pair selection: RHM re-scoring, foreground, greedy one-to-one.
* :mod:`.saliency` -- the foreground priors: class-token attention (ViT), class activation maps (CNN), any callable.
* :mod:`.consistency` -- the close-loop consistency check (source -> third -> target -> source).
* :mod:`.convert_ibot_checkpoint` -- iBOT's official ViT-B/16 checkpoint -> safetensors for timm.
"""

from .configuration_cascaded_mil import CascadedMILConfig, CascadedMILStageConfig
from .consistency import consistency_scores
from .modeling_cascaded_mil import CascadedMILModel, CascadedMILOutput, CascadedMILPreTrainedModel

__all__ = [
    "CascadedMILConfig",
    "CascadedMILModel",
    "CascadedMILOutput",
    "CascadedMILPreTrainedModel",
    "CascadedMILStageConfig",
    "consistency_scores",
]
