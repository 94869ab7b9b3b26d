"""Convert an official iBOT checkpoint (Zhou et al., *iBOT: Image BERT Pre-Training with Online
Tokenizer*, ICLR 2022; bytedance/ibot) to a timm ViT safetensors file.

Huang et al. (ICCV 2023) train cascaded online correspondence refinement on an iBOT ViT-B/16. The
released files are pickled PyTorch checkpoints in two layouts:

* the full training checkpoint (``checkpoint.pth``): the EMA teacher under ``teacher`` (also
  ``student``, optimiser state, ...), keys ``backbone.*`` for the ViT and ``head.*`` for the
  iBOT projection heads, possibly behind the ``module.`` prefix of ``DistributedDataParallel``;
* the backbone-only release (``checkpoint_teacher.pth``): the teacher ViT under ``state_dict``
  (a ``state_dict`` holding a ``teacher`` entry is read as the full layout).

iBOT's ViT uses timm's key names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.attn.qkv``, ...), so the conversion strips the prefixes, drops the heads (keys starting
with ``head``) and iBOT's mask token (``masked_embed``, unused at inference), and checks every
remaining key and shape against ``timm.create_model(model_name, pretrained=False).state_dict()``.
The timm classifier ``head.weight`` / ``head.bias`` has no counterpart (iBOT is self-supervised):
the file loads into models built with ``num_classes=0`` -- every
:class:`~semcorr.modeling.FeatureBackbone` ViT, through
:func:`~semcorr.modeling.load_backbone_weights`, or
``timm.create_model(model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))``.

The checkpoint is read with ``torch.load(weights_only=True)`` only: nothing but tensors, plain
containers and the ``argparse.Namespace`` of the training arguments is unpickled.

Usage::

    python -m semcorr.modeling.cascaded_mil.convert_ibot_checkpoint --checkpoint checkpoint.pth \\
        --output vit_base_patch16_ibot.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from semcorr.utils import atomic_save, sha256_file

DEFAULT_MODEL = "vit_base_patch16_224"
#: Prefixes of wrappers around the ViT's own key names.
STRIPPED_PREFIXES = ("module.", "backbone.")
#: iBOT-only entries with no timm counterpart: the projection heads and the mask token.
DROPPED_PREFIXES = ("head", "masked_embed")
#: The timm classifier, absent from a self-supervised checkpoint.
CLASSIFIER_KEYS = ("head.weight", "head.bias")


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """``torch.load(weights_only=True)`` of ``path``; unreadable files raise a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        # iBOT's full checkpoints also hold the training arguments (an argparse.Namespace of plain
        # values): allow that one class, still under the tensors-only unpickler.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusals, truncated files, not a torch file at all
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not read {path} as a tensors-only torch checkpoint: {first}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not an iBOT checkpoint dict")
    return obj


def teacher_state_dict(checkpoint: Mapping, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """The teacher's tensors of an iBOT checkpoint, keys as stored.

    ``checkpoint_key`` picks another entry (``"student"``); by default ``teacher``, then
    ``state_dict.teacher``, then ``state_dict`` (the backbone-only release).
    """
    if checkpoint_key is not None:
        candidates = [(checkpoint_key, checkpoint.get(checkpoint_key))]
    else:
        nested = checkpoint.get("state_dict")
        candidates = [("teacher", checkpoint.get("teacher"))]
        if isinstance(nested, Mapping):
            candidates += [("state_dict.teacher", nested.get("teacher")), ("state_dict", nested)]
    for name, entry in candidates:
        if isinstance(entry, Mapping):
            tensors = {key: value for key, value in entry.items() if isinstance(value, torch.Tensor)}
            if not tensors:
                raise ValueError(f"checkpoint entry '{name}' holds no tensors")
            return tensors
    wanted = f"'{checkpoint_key}'" if checkpoint_key else "'teacher' (or 'state_dict')"
    raise ValueError(
        f"no {wanted} entry in the checkpoint: is it an iBOT checkpoint? top-level keys: "
        f"{sorted(map(str, checkpoint))[:10]} (pass --checkpoint-key to choose one)"
    )


def strip_key(key: str) -> str:
    """``module.backbone.blocks.0...`` -> ``blocks.0...`` (wrappers in any order, repeated)."""
    while key.startswith(STRIPPED_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def to_timm_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes and drop the iBOT-only entries: ``(tensors, dropped keys)``."""
    converted, dropped = {}, []
    for key, value in state.items():
        name = strip_key(key)
        if name.startswith(DROPPED_PREFIXES):
            dropped.append(key)
        else:
            converted[name] = value.detach().contiguous()
    return converted, dropped


def check_against_timm(state: Mapping[str, torch.Tensor], model_name: str) -> None:
    """Every key of timm ``model_name`` (classifier aside) present with its shape, and nothing else.

    Raises:
        ValueError: listing the missing keys, unexpected keys and shape mismatches.
    """
    import timm

    try:
        with torch.device("meta"):  # names and shapes only: nothing allocated or initialised
            reference = timm.create_model(model_name, pretrained=False).state_dict()
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ValueError(f"cannot build timm '{model_name}': {error}") from None
    expected = {key: value for key, value in reference.items() if key not in CLASSIFIER_KEYS}
    missing = sorted(key for key in expected if key not in state)
    unexpected = sorted(key for key in state if key not in expected)
    mismatched = sorted(
        f"{key}: checkpoint {tuple(value.shape)} vs timm {tuple(expected[key].shape)}"
        for key, value in state.items() if key in expected and value.shape != expected[key].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:6]) + _size_hint(state))
    if problems:
        raise ValueError(f"the checkpoint does not fit timm '{model_name}' - " + " | ".join(problems))


def _first(keys: list[str], count: int = 12) -> str:
    """The first ``count`` keys, comma-separated (a whole list could fill a screen)."""
    return ", ".join(keys[:count]) + (" ..." if len(keys) > count else "")


def _size_hint(state: Mapping[str, torch.Tensor]) -> str:
    """A hint naming the checkpoint's own width, depth and patch size (another --model may fit)."""
    patch = state.get("patch_embed.proj.weight")
    if patch is None:
        return ""
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return (f" (the checkpoint is a ViT of width {patch.shape[0]}, depth {depth}, patch {patch.shape[-1]}: "
            "pass the matching timm name with --model, e.g. vit_small_patch16_224 for width 384)")


def convert_ibot_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model_name: str = DEFAULT_MODEL,
    checkpoint_key: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the iBOT teacher ViT of ``checkpoint_path`` as a timm safetensors file.

    Args:
        checkpoint_path: the released ``.pth`` (either layout of the module docstring).
        output_path: a ``.safetensors`` file to write (atomically).
        model_name: the timm architecture the keys and shapes are checked against.
        checkpoint_key: the entry to convert when not the teacher (``"student"``).
        overwrite: replace an existing output file.

    Returns:
        ``output_path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: an unreadable checkpoint, no teacher entry, keys or shapes that do not fit
            ``model_name``, or a bad output path.
    """
    output = Path(output_path)
    if output.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got '{output.name}'")
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists (pass overwrite=True / --overwrite)")
    checkpoint = Path(checkpoint_path)
    state, dropped = to_timm_keys(teacher_state_dict(read_checkpoint(checkpoint), checkpoint_key))
    check_against_timm(state, model_name)
    metadata = {"format": "pt", "source": "bytedance/ibot", "architecture": model_name,
                "checkpoint": checkpoint.name, "checkpoint_sha256": sha256_file(checkpoint),
                "dropped_keys": str(len(dropped))}
    return atomic_save(output, lambda temporary: save_file(state, str(temporary), metadata=metadata))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semcorr.modeling.cascaded_mil.convert_ibot_checkpoint",
        description="Convert an official iBOT checkpoint (teacher ViT) to a timm safetensors file.",
    )
    parser.add_argument("--checkpoint", required=True, help="the released checkpoint.pth / checkpoint_teacher.pth")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"timm architecture to check against (default {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint-key", default=None, help="entry to convert instead of the teacher (e.g. student)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        output = convert_ibot_checkpoint(args.checkpoint, args.output, args.model, args.checkpoint_key, args.overwrite)
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the exception held
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
