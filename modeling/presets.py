"""Named presets: zero-shot Hyperpixel Flow on self-supervised vision transformers (DINO, DINOv2).

A preset is a :class:`~semcorr.modeling.HyperpixelFlowConfig` (backbone, blocks, input size,
feature stride = patch size, similarity power, RHM on or off) plus the text of its model card::

    from semcorr.modeling.presets import load_preset, save_preset

    model = load_preset("dinov2-base", weights="timm")               # online: timm's weights from the Hub
    model = load_preset("dinov2-base", weights="dinov2-b.safetensors")  # offline: a local file
    save_preset("dinov2-base", "dinov2-base-hpf", weights="timm")    # a Hub repo folder, with its card
    config = HyperpixelFlowConfig.from_preset("dinov2-base", image_size=[840, 840])

Nothing here is trained: the matcher is the backbone's patch tokens compared by cosine
similarity, re-scored by regularised Hough matching (Min et al., ICCV 2019) unless ``use_rhm`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backbone import load_backbone_weights
from .hyperpixel.configuration_hyperpixel import HyperpixelFlowConfig

#: ImageNet statistics: the input normalisation DINO and DINOv2 were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CARD_TEMPLATE = Path(__file__).parent / "cards" / "hyperpixel_vit_preset.md"


@dataclass(frozen=True)
class Preset:
    """One named zero-shot matcher.

    Args:
        backbone: timm name with its pretrained tag (the Hub repo ``timm/<backbone>``).
        blocks: 0-based transformer blocks whose patch tokens form the hyperpixels.
        patch_size: the ViT's patch side in pixels; also the hyperpixel stride (one cell per patch).
        image_size: ``(height, width)`` model input, a multiple of ``patch_size``.
        similarity_power, use_rhm: Hyperpixel Flow's re-scoring.
        title: one line for the card.
        rationale: why these blocks and this size (markdown, for the card).
        license: the licence of the backbone weights.
    """

    backbone: str
    blocks: tuple[int, ...]
    patch_size: int
    image_size: tuple[int, int]
    similarity_power: float
    use_rhm: bool
    title: str
    rationale: str
    license: str = "apache-2.0"

    def config_fields(self) -> dict:
        """Keyword arguments of :class:`HyperpixelFlowConfig` for this preset."""
        return dict(
            backbone=self.backbone, backbone_layers=list(self.blocks), feature_stride=self.patch_size,
            image_size=list(self.image_size), image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
            similarity_power=self.similarity_power, use_rhm=self.use_rhm, backbone_weights=None,
        )


_DINOV2_LAST_BLOCK = (
    "The patch tokens of the **last block** (before the final norm): the layer the DINOv2-based "
    "zero-shot matchers take their descriptors from (Zhang et al., NeurIPS 2023, *A Tale of Two "
    "Features*; Zhang et al., CVPR 2024, GeoAware-SC), one level as they use it. **518 × 518** is "
    "DINOv2's own high-resolution training size: the 37 × 37 position embedding is used as trained, "
    "without interpolation. The literature numbers below use 840 × 840 (60 × 60 patches); pass "
    "`image_size=[840, 840]` to match them (2.6× the cells, 6.9× the cell pairs that RHM scores)."
)

#: The shipped presets, by name.
PRESETS: dict[str, Preset] = {
    "dino-base": Preset(
        backbone="vit_base_patch16_224.dino", blocks=(9, 11), patch_size=16, image_size=(448, 448),
        similarity_power=3.0, use_rhm=True,
        title="Hyperpixel Flow on DINO ViT-B/16 (blocks 9 and 11), 448²",
        rationale=(
            "Blocks **9 and 11**: block 9 is the layer Amir et al. (2021, *Deep ViT Features as Dense "
            "Visual Descriptors*) take their correspondence descriptors from -- semantic yet still "
            "positional (they use its attention keys, here its output tokens) -- and block 11, the last, "
            "the most semantic; Hyperpixel Flow averages their cosines, as it mixes CNN stages. DINO "
            "was trained at 224² (14 × 14 patches), too coarse to localise parts: **448 × 448** gives "
            "28 × 28 cells of 16 px, the position embedding interpolated by timm."
        ),
    ),
    "dinov2-small": Preset(
        backbone="vit_small_patch14_dinov2.lvd142m", blocks=(11,), patch_size=14, image_size=(518, 518),
        similarity_power=3.0, use_rhm=True,
        title="Hyperpixel Flow on DINOv2 ViT-S/14 (last block), 518²",
        rationale=_DINOV2_LAST_BLOCK,
    ),
    "dinov2-base": Preset(
        backbone="vit_base_patch14_dinov2.lvd142m", blocks=(11,), patch_size=14, image_size=(518, 518),
        similarity_power=3.0, use_rhm=True,
        title="Hyperpixel Flow on DINOv2 ViT-B/14 (last block), 518²",
        rationale=_DINOV2_LAST_BLOCK,
    ),
    "dinov2-base-nn": Preset(
        backbone="vit_base_patch14_dinov2.lvd142m", blocks=(11,), patch_size=14, image_size=(518, 518),
        similarity_power=3.0, use_rhm=False,
        title="DINOv2 ViT-B/14 (last block) + nearest neighbour, 518²",
        rationale=(
            _DINOV2_LAST_BLOCK + " **RHM off**: every source patch goes to its most similar target "
            "patch (refined to sub-cell precision; a keypoint follows the patches around it), close to "
            "the zero-shot protocol of the DINOv2 nearest-neighbour baseline in the table below; "
            "compare it with `dinov2-base` to see what the Hough re-scoring adds."
        ),
    ),
}


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name`` (``ValueError`` naming the valid ones otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; the presets are: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_config(name: str, **overrides) -> HyperpixelFlowConfig:
    """:class:`HyperpixelFlowConfig` of preset ``name``; keyword overrides change any field.

    Raises:
        ValueError: an unknown preset, or an ``image_size`` that is not a multiple of the
            ``feature_stride`` (a partial patch would be resampled and the grid no longer cover
            whole patches).
    """
    fields = {**get_preset(name).config_fields(), **overrides, "preset": name}
    config = HyperpixelFlowConfig(**fields)
    if any(side % config.feature_stride for side in config.image_size):
        raise ValueError(
            f"preset '{name}': image_size {config.image_size} must be a multiple of the patch size "
            f"{config.feature_stride} in both sides"
        )
    return config


def load_preset(name: str, weights: str | Path | None = None, **overrides):
    """A :class:`~semcorr.modeling.HyperpixelFlowModel` of preset ``name``, in eval mode.

    Args:
        weights: ``None`` (random backbone, for tests and shapes), ``"timm"`` (the preset's timm
            weights from the Hugging Face Hub; offline a ``ValueError`` says which file to pass) or
            a local safetensors file with the *full* timm model's state dict at any resolution.
        overrides: :class:`HyperpixelFlowConfig` fields (``image_size``, ``use_rhm``, ...).
    """
    from .hyperpixel.modeling_hyperpixel import HyperpixelFlowModel

    label = None if weights is None else ("timm" if weights == "timm" else Path(weights).name)
    model = HyperpixelFlowModel(preset_config(name, backbone_weights=label, **overrides))
    if weights is not None:
        load_backbone_weights(model.backbone, weights)
    return model.eval()


def save_preset(name: str, directory: str | Path, weights: str | Path = "timm", **overrides) -> Path:
    """Write preset ``name`` as a Hub model repo: ``config.json``, ``model.safetensors``,
    ``preprocessor_config.json`` and ``README.md`` (the model card).

    ``AutoModel.from_pretrained(directory)`` and ``pipeline("semantic-correspondence", model=directory)``
    then load it offline; ``huggingface_hub.upload_folder`` publishes it.
    """
    from .image_processing_semcorr import image_processor_for

    directory = Path(directory)
    model = load_preset(name, weights=weights, **overrides)
    model.save_pretrained(directory)
    image_processor_for(model.config).save_pretrained(directory)
    (directory / "README.md").write_text(model_card(name, model.config), encoding="utf-8")
    return directory


def model_card(name: str, config: HyperpixelFlowConfig | None = None) -> str:
    """The model card (Hub ``README.md``) of preset ``name``, describing ``config`` (default: the preset's)."""
    preset = get_preset(name)
    config = config or preset_config(name)
    height, width = config.image_size
    stride = config.feature_stride
    return _CARD_TEMPLATE.read_text(encoding="utf-8").format(
        name=name, title=preset.title, license=preset.license, backbone=config.backbone,
        blocks=", ".join(str(block) for block in config.backbone_layers), height=height, width=width,
        stride=stride, grid_height=height // stride, grid_width=width // stride,
        similarity_power=f"{config.similarity_power:g}", rescoring="regularised Hough matching (RHM)"
        if config.use_rhm else "none (nearest neighbour)", weights=config.backbone_weights or "random (untrained)",
        rationale=preset.rationale,
    )
