"""Models offline: project configs registered, every checkpoint format, never a download."""

import pytest
import torch
from safetensors.torch import save_file

from clipse.models import (
    PROJECT_MODELS,
    cached_pretrained_file,
    create_model,
    list_models,
    resolve_weights,
)
from clipse.util.errors import UserError


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def trained_like():
    torch.manual_seed(123)
    model = create_model("clipse-tiny").model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_project_models_are_registered_and_listed():
    assert {"clipse-tiny", "clipse-tiny-64", "clipse-small"} <= set(PROJECT_MODELS)
    assert list_models()[: len(PROJECT_MODELS)] == PROJECT_MODELS and "ViT-B-32" in list_models()
    loaded = create_model("clipse-tiny")
    assert loaded.image_size == 32 and loaded.weights == "random init"
    assert loaded.tokenizer(["a red circle"]).shape == (1, 32)


@pytest.mark.parametrize("fmt", ["state_dict", "open_clip_training", "safetensors", "clipse_run"])
def test_checkpoint_formats_load_bit_for_bit(tmp_path, trained_like, fmt):
    state = trained_like.state_dict()
    if fmt == "state_dict":
        path = tmp_path / "weights.pt"
        torch.save(state, path)
    elif fmt == "open_clip_training":  # what open_clip_train writes under DDP
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {}}, path)
    elif fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "best.pt"
        torch.save({"state_dict": state, "epoch": 2, "metrics": {}, "config": {}}, path)
    loaded = create_model("clipse-tiny", str(path))
    assert loaded.weights == str(path)
    assert_same_weights(loaded.model, trained_like)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(create_model("clipse-small").model.state_dict(), path)
    with pytest.raises(UserError, match=r"small.pt: does not fit model clipse-tiny"):
        create_model("clipse-tiny", str(path))
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"broken.pt: cannot read checkpoint"):
        create_model("clipse-tiny", str(tmp_path / "broken.pt"))
    with pytest.raises(UserError, match=r"missing.pt: checkpoint file not found"):
        create_model("clipse-tiny", str(tmp_path / "missing.pt"))


def test_uncached_tag_fails_at_once_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"ViT-B-32/laion2b_s34b_b79k are not in the local cache.*pre-stage"):
        resolve_weights("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(UserError, match=r"'nonsense' is neither a file nor a pretrained tag of ViT-B-32"):
        resolve_weights("ViT-B-32", "nonsense")
    with pytest.raises(UserError, match=r"unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99")


def test_cached_tag_resolves_to_the_local_file(tmp_path, monkeypatch):
    """An HF-hub cache laid out as huggingface_hub writes it, and OpenCLIP's URL cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    repo = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    assert cached_pretrained_file("ViT-B-32", "laion2b_s34b_b79k") == snapshot / "open_clip_model.safetensors"
    url_cache = tmp_path / ".cache" / "clip"
    url_cache.mkdir(parents=True)
    (url_cache / "ViT-B-32.pt").write_bytes(b"x")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    assert resolve_weights("ViT-B-32", "openai") == url_cache / "ViT-B-32.pt"
