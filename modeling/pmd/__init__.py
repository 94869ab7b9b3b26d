"""PMD (Li et al., *Probabilistic Model Distillation for Semantic Correspondence*, CVPR 2021).

* :mod:`.configuration_pmd` -- teacher and student configs.
* :mod:`.modeling_pmd` -- the SFNet-based network, the probabilistic teacher and the static student.
* :mod:`.layers` -- residual adaptation blocks and the (stochastic) co-channel attention.
* :mod:`.losses` -- grid regression, smoothness, PSR weights, the cycle mask and CAL.
* :mod:`.convert_pmd_original_checkpoint` -- the official student checkpoints -> semcorr.
"""

from .configuration_pmd import PMDConfig, PMDStudentConfig, PMDTeacherConfig
from .modeling_pmd import PMDOutput, PMDPreTrainedModel, PMDStudentModel, PMDTeacherModel

__all__ = [
    "PMDConfig",
    "PMDOutput",
    "PMDPreTrainedModel",
    "PMDStudentConfig",
    "PMDStudentModel",
    "PMDTeacherConfig",
    "PMDTeacherModel",
]
