"""The tests never write into the user's caches: conftest.py points every HF cache at a session folder."""

from __future__ import annotations

from pathlib import Path

from semcorr.tests.fixtures_benchmarks import write_pf_willow

from .conftest import HF_TEST_HOME

USER_CACHE = (Path.home() / ".cache").resolve()
SESSION = Path(HF_TEST_HOME).resolve()


def _outside_the_user_cache(path) -> bool:
    resolved = Path(path).expanduser().resolve()
    return resolved.is_relative_to(SESSION) and not resolved.is_relative_to(USER_CACHE)


def test_hf_libraries_read_the_session_folder():
    import datasets
    import evaluate
    import huggingface_hub

    paths = {
        "datasets cache": datasets.config.HF_DATASETS_CACHE,
        "datasets modules": datasets.config.HF_MODULES_CACHE,
        "hub cache": huggingface_hub.constants.HF_HUB_CACHE,
        "hub home": huggingface_hub.constants.HF_HOME,
        "evaluate modules": evaluate.config.HF_MODULES_CACHE,
        "evaluate metrics": evaluate.config.HF_METRICS_CACHE,
    }
    assert not SESSION.is_relative_to(USER_CACHE)
    wrong = {name: str(path) for name, path in paths.items() if not _outside_the_user_cache(path)}
    assert not wrong, f"not under the session folder {SESSION}: {wrong}"


def test_a_benchmark_prepared_without_cache_dir_lands_in_the_session_folder(tmp_path, datasets_offline):
    """``load_benchmark`` with no ``cache_dir`` writes its Arrow files to the datasets default cache."""
    from semcorr.hub_datasets import load_benchmark

    dataset = load_benchmark("pf-willow", str(write_pf_willow(tmp_path)), split="test")
    files = [Path(entry["filename"]) for entry in dataset.cache_files]
    assert files, "the benchmark was not written to a datasets cache"
    assert all(_outside_the_user_cache(file) for file in files), files
    assert all(file.resolve().is_relative_to(SESSION / "huggingface" / "datasets") for file in files), files
