"""Checkpoint loading per role and its errors. Uses the committed HF fixtures (tests/fixtures/hf)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from msjax.checkpoint import TensorReader, load_attention_role, load_expert_role, load_model, read_config
from msjax.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def _is_expert_tensor(name: str) -> bool:
    return ".experts." in name


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "dbrx"])
def test_attention_role_reads_no_expert_tensor(name):
    path = FIXTURES / name
    reader = TensorReader(path)
    load_attention_role(path, reader=reader)
    assert reader.names_read and not any(_is_expert_tensor(n) for n in reader.names_read)
    assert any("shared_expert" in n for n in reader.names_read) == (name == "qwen2_moe")  # shared stays here


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "dbrx"])
def test_expert_role_reads_only_its_experts(name):
    path = FIXTURES / name
    cfg = read_config(path)
    mine = (1, 3)
    reader = TensorReader(path)
    role = load_expert_role(path, cfg, expert_ids=mine, reader=reader)
    assert role.w_gate_up.shape[:2] == (cfg.num_layers, len(mine))
    assert reader.names_read and all(_is_expert_tensor(n) for n in reader.names_read)
    expert_bytes = cfg.num_layers * len(mine) * 3 * cfg.hidden_size * cfg.expert_ffn_size * 4
    assert reader.bytes_read == expert_bytes  # exactly its experts' weights, nothing else
    if name == "dbrx":  # fused [experts * ffn, hidden] tensors: only this node's rows were read
        f = cfg.expert_ffn_size
        assert f"transformer.blocks.0.ffn.experts.mlp.w1[{f}:{2 * f}]" in reader.names_read
    else:
        assert not any(".experts.0." in n or ".experts.2." in n for n in reader.names_read)


def test_expert_subset_matches_full_load():
    path = FIXTURES / "qwen3_moe"
    full = load_expert_role(path)
    part = load_expert_role(path, expert_ids=(4, 1))
    np.testing.assert_array_equal(np.asarray(part.w_gate_up[...]), np.asarray(full.w_gate_up[...])[:, [4, 1]])
    np.testing.assert_array_equal(np.asarray(part.w_down[...]), np.asarray(full.w_down[...])[:, [4, 1]])


def test_sharded_checkpoint_loads():
    assert (FIXTURES / "mixtral" / "model.safetensors.index.json").exists()
    model = load_model(FIXTURES / "mixtral")
    assert model.cfg.head_dim == 16 and model.cfg.num_heads * model.cfg.head_dim != model.cfg.hidden_size


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _rewrite_tensor(path: Path, file: str, drop: str | None = None, reshape: tuple[str, list] | None = None):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / file))
    if drop:
        del tensors[drop]
    if reshape:
        name, shape = reshape
        tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(path / file))


def test_missing_tensor_is_named(tmp_path):
    path = _copy(tmp_path, "olmoe")
    _rewrite_tensor(path, "model.safetensors", drop="model.layers.1.self_attn.k_norm.weight")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.k_norm.weight' is missing "
                                              r"\(expected shape \(24,\)\)"):
        load_model(path)


def test_wrong_shape_is_named(tmp_path):
    path = _copy(tmp_path, "qwen2_moe")
    _rewrite_tensor(path, "model.safetensors", reshape=("model.layers.0.mlp.experts.7.up_proj.weight", [24, 40]))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.experts.7.up_proj.weight' has shape \(24, 40\), "
                                              r"expected \(24, 48\)"):
        load_model(path)


def test_truncated_shard_is_named(tmp_path):
    path = _copy(tmp_path, "mixtral")
    shard = path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*truncated"):
        load_model(path)


def test_missing_shard_and_bad_index(tmp_path):
    path = _copy(tmp_path, "mixtral")
    (path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00003-of-00003.safetensors named in the index is missing"):
        load_model(path)
    (path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_model(path)


def test_directory_without_weights(tmp_path):
    shutil.copy(FIXTURES / "dbrx" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_config_that_contradicts_the_weights(tmp_path):
    path = _copy(tmp_path, "dbrx")
    hf = json.loads((path / "config.json").read_text())
    hf["ffn_config"]["ffn_hidden_size"] = 40
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"transformer.blocks.0.ffn.experts.mlp.w1' has shape \(192, 48\), "
                                              r"expected \(240, 48\)"):
        load_model(path)
