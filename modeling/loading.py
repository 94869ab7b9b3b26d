"""One way to get a ready matcher from whatever the user named: an id, a folder, a model or a pipeline.

Whatever cannot be loaded fails with one ``ValueError`` that says what is wrong and what to do: a
folder that does not exist, a folder of another library's model, pickle weights (only
safetensors are ever read from a user's path; a pickle is never opened), a Hub id that is not in
the cache while offline, a device that is not there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

#: ``model_id`` reported for the embedded default model (it has no Hub id).
EMBEDDED_MODEL_ID = "embedded-default"

#: Weight files that only ``pickle`` can read; semcorr never opens them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def resolve_device(device=None) -> torch.device:
    """``device`` (a string, a ``torch.device`` or None) as a ``torch.device`` that is present here.

    None means cuda when available, else cpu.

    Raises:
        ValueError: an unknown device name, or a CUDA / MPS device this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; give e.g. 'cpu', 'cuda' or 'cuda:1' (--device)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r}: no CUDA device is available here (torch.cuda.is_available() is False); "
                "use device 'cpu' (--device cpu)"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; pick one of them or 'cpu' (--device)")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r}: no MPS device is available here; use device 'cpu' (--device cpu)")
    return resolved


def load_matcher(model_or_id=None, image_processor=None, device=None):
    """A semcorr matcher in eval mode with its image processor.

    Args:
        model_or_id: ``None`` (the embedded default), a model directory or Hub id, a model object
            with ``match()`` and a ``config``, or a ``semantic-correspondence`` pipeline.
        image_processor: overrides the checkpoint's processor.
        device: torch device for a model loaded here (default: cuda when available, else cpu); a
            model object passed in moves only when ``device`` is given.

    Returns:
        ``(model, image_processor, model_id)``: the processor is the checkpoint's, else one built
        from the config (:func:`~semcorr.modeling.image_processor_for`); ``model_id`` is the id or
        path given, the config's ``_name_or_path`` of an object, or :data:`EMBEDDED_MODEL_ID`.

    Raises:
        ValueError: nothing loadable at the path or id -- the message says why: a folder that does not
            exist, a folder without a semcorr ``config.json`` (another library's model), weights that
            are not safetensors, a Hub id that is neither cached nor reachable -- a device that is
            not available, or a model without ``match()`` (not a semcorr matcher).
    """
    if model_or_id is None or isinstance(model_or_id, (str, os.PathLike)):
        device = resolve_device(device)  # before the weights are read
        model, image_processor, model_id = _from_pretrained(model_or_id, image_processor)
        model = model.to(device)
    else:
        model = model_or_id
        if hasattr(model, "model") and not callable(getattr(model, "match", None)):  # a pipeline
            image_processor = image_processor or getattr(model, "image_processor", None)
            model = model.model
        model_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        if device is not None:
            model = model.to(resolve_device(device))
    if not callable(getattr(model, "match", None)):
        raise ValueError(f"{type(model).__name__} has no match(); give a semcorr matcher (a model saved by semcorr)")
    if image_processor is None:
        from .image_processing_semcorr import image_processor_for

        image_processor = image_processor_for(model.config)
    if hasattr(model, "eval"):
        model.eval()
    return model, image_processor, model_id


def _from_pretrained(model_id, image_processor):
    """``(model, processor or None, model_id)`` read from a folder or Hub id (None: the embedded default)."""
    from transformers import AutoImageProcessor, AutoModel

    import semcorr.modeling  # noqa: F401  (registers the Auto classes)

    if model_id is None:
        from .default_model import default_model_dir

        path, model_id = str(default_model_dir()), EMBEDDED_MODEL_ID
    else:
        model_id = str(model_id)
        path = str(_model_folder(model_id))
    try:
        model = AutoModel.from_pretrained(path, use_safetensors=True)  # never unpickles
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"could not load the semcorr model in {path}: {_first_line(error)}") from None
    if image_processor is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError):  # no preprocessor_config.json: built from the config below
            image_processor = None
    return model, image_processor, model_id


def check_model_source(model_or_id) -> None:
    """Fail early when the folder or Hub id ``model_or_id`` is not a loadable semcorr model (see :func:`load_matcher`).

    Reads only ``config.json`` and the file names (a Hub id is fetched into the cache); None and
    model objects pass.

    Raises:
        ValueError: saying what is wrong and what to give instead.
    """
    if isinstance(model_or_id, (str, os.PathLike)):
        _model_folder(str(model_or_id))


def semcorr_model_types() -> list[str]:
    """The ``model_type`` of every semcorr model registered with ``AutoConfig`` (sorted)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import semcorr.modeling  # noqa: F401  (registers the Auto classes)

    types, stack = set(), list(PretrainedConfig.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        model_type = getattr(cls, "model_type", "")
        if cls.__module__.startswith("semcorr.") and model_type and model_type in CONFIG_MAPPING:
            types.add(model_type)
    return sorted(types)


def _model_folder(model_id: str) -> Path:
    """The local folder of ``model_id`` (a folder, or a Hub id fetched into the HF cache), checked for a semcorr model."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return check_model_folder(path)
    if path.exists():
        raise ValueError(f"model {model_id!r} is a file; give the folder a semcorr model was saved to with "
                         "save_pretrained (config.json + model.safetensors), or a Hub id such as 'org/name'")
    if not _is_hub_id(model_id):
        raise ValueError(f"model folder {model_id!r} does not exist; give an existing folder saved with "
                         "save_pretrained, or a Hub model id, which looks like 'org/name'")
    return check_model_folder(_hub_snapshot(model_id), where=f"Hub model {model_id!r}")


def check_model_folder(path: Path, where: str | None = None) -> Path:
    """Check that ``path`` holds a semcorr model saved with ``save_pretrained``; return it.

    Raises:
        ValueError: no ``config.json``, a config of another library (its ``model_type`` and the
            semcorr ones are named), or no ``model.safetensors`` (pickle weights are named, with
            how to convert them).
    """
    where = where or f"model folder {str(path)!r}"
    files = [entry.name for entry in path.iterdir() if entry.is_file()]
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    has_safetensors = any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in files)
    config_file = path / "config.json"
    if not config_file.is_file():
        if pickles and not has_safetensors:
            raise ValueError(_pickle_message(path, where, pickles) + "; the folder also needs the model's "
                             "config.json (model.save_pretrained(folder) writes both)")
        raise ValueError(f"{where} holds no config.json, so it is not a saved model; save a semcorr model there with "
                         "model.save_pretrained(folder), or give a Hub id such as 'org/name'")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{config_file} is not a readable JSON config ({_first_line(error)}); "
                         "save the model again with save_pretrained") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    known = semcorr_model_types()
    if model_type not in known:
        what = f"model_type {model_type!r}" if model_type else "its config.json names no model_type"
        raise ValueError(f"{where} is not a semcorr model ({what}); semcorr model types: {', '.join(known)}; "
                         "give a folder saved by a semcorr model's save_pretrained")
    if not has_safetensors:
        if pickles:
            raise ValueError(_pickle_message(path, where, pickles))
        raise ValueError(f"{where} holds no model.safetensors weights; save the model with save_pretrained")
    return path


def _pickle_message(path: Path, where: str, pickles: list[str]) -> str:
    source, target = path / pickles[0], path / "model.safetensors"
    return (
        f"{where} holds {', '.join(pickles)} but no .safetensors weights: only safetensors weights are loaded (a "
        f"pickle file can run code, so semcorr never opens one); convert it with: "
        f"import torch, safetensors.torch; "
        f"safetensors.torch.save_file(torch.load({str(source)!r}, weights_only=True), {str(target)!r}) "
        "-- or load the model in Python and call model.save_pretrained(folder)"
    )


def _is_hub_id(text: str) -> bool:
    """Whether ``text`` is spelled like a Hub repo id (``name`` or ``org/name``), not like a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(text).is_absolute() or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str) -> Path:
    """The cached (or downloaded) files of Hub model ``repo_id`` a semcorr model needs; ValueError saying why not."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.md", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is neither an existing folder nor a model on the Hugging Face Hub (or it is "
                         "private or gated: log in with `hf auth login`); give a model folder or a Hub id "
                         "such as 'org/name'") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"{repo_id!r} is not an existing folder, and as a Hub model it is not in the Hugging Face "
                             "cache while the Hub is offline (HF_HUB_OFFLINE=1); download it once online "
                             f"(hf download {repo_id}) or give the path of a model folder") from None
        raise ValueError(f"{repo_id!r} is not an existing folder, and the Hub could not be reached to fetch it (nor "
                         "is it in the Hugging Face cache); check the connection, or give the path of a model "
                         "folder") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"could not fetch Hub model {repo_id!r} ({_first_line(error)}); give a model folder "
                         "or a Hub id such as 'org/name'") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
