"""model_paths.resolve_existing: a local model path that is not a folder is refused with its name."""

import pytest

from edge_vlm_ros.core.model_paths import resolve_existing


def test_a_missing_local_folder_is_refused_with_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        resolve_existing(missing)


def test_an_existing_folder_and_a_hub_id_pass_unchanged(tmp_path):
    assert resolve_existing(str(tmp_path)) == str(tmp_path)
    assert resolve_existing("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
