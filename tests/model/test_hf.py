"""Hugging Face interop of the model: names, config and weights against transformers' own LlamaForCausalLM."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lotus_dist.errors import UserError
from lotus_dist.model.hf import (INDEX_FILE, hf_config, hf_name, load_hf_weights, our_name, plan_shards,
                                 read_hf_folder, shard_file_names)
from lotus_dist.model.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

CFG = LlamaConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64, rope_theta=5000.0,
                  norm_eps=1e-5)


def write_folder(path, tensors: dict, config: dict, max_bytes: int = 10**9):
    """A save_pretrained-style folder of ``tensors`` (HF names), sharded like the exporter does."""
    path.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(((n, t.numel() * t.element_size()) for n, t in tensors.items()), max_bytes)
    files = shard_file_names(len(shards))
    for shard, file in zip(shards, files):
        save_file({n: tensors[n].contiguous() for n in shard}, str(path / file), metadata={"format": "pt"})
    if len(files) > 1:
        weight_map = {n: f for shard, f in zip(shards, files) for n in shard}
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return path


def ours_as_hf(model):
    return {hf_name(n): p.detach().clone() for n, p in model.named_parameters()}


def test_names_and_config_are_transformers_own():
    torch.manual_seed(0)
    ours = Llama(CFG)
    config = transformers.LlamaConfig(**hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2))
    theirs = transformers.LlamaForCausalLM(config)
    expected = {n: tuple(t.shape) for n, t in theirs.state_dict().items() if "rotary" not in n}
    assert {hf_name(n): tuple(p.shape) for n, p in ours.named_parameters()} == expected
    assert all(our_name(hf_name(n)) == n for n, _ in ours.named_parameters())


def test_transformers_computes_our_logits_from_a_folder(tmp_path):
    torch.manual_seed(0)
    ours = Llama(CFG).eval()
    folder = write_folder(tmp_path / "hf", ours_as_hf(ours), hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2),
                          max_bytes=20_000)  # several shards and an index
    assert (folder / INDEX_FILE).is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() <= 1e-5


def test_load_hf_weights_round_trip_and_untied_head(tmp_path):
    torch.manual_seed(0)
    source = Llama(CFG)
    folder = write_folder(tmp_path / "hf", ours_as_hf(source), hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2))
    with torch.device("meta"):
        target = Llama(CFG)
    target.to_empty(device="cpu")
    load_hf_weights(target, folder, log=lambda line: None)
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name
    assert read_hf_folder(folder).keys() == dict(source.named_parameters()).keys()

    # a folder with tied embeddings (no lm_head tensor): the head starts as the embedding
    tied = ours_as_hf(source)
    del tied["lm_head.weight"]
    config = dict(hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2), tie_word_embeddings=True)
    notes = []
    load_hf_weights(target, write_folder(tmp_path / "tied", tied, config), log=notes.append)
    assert torch.equal(target.lm_head.weight, source.embed_tokens.weight) and "ties" in notes[0]


def test_load_hf_weights_sliced_by_local_part(tmp_path):
    """The sharded path: each parameter's full tensor is read once and only this process's rows are kept."""
    torch.manual_seed(0)
    source = Llama(CFG)
    folder = write_folder(tmp_path / "hf", ours_as_hf(source), hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2))
    target = Llama(CFG)

    def second_half(p, full):  # what FSDP2's dim-0 shard of rank 1 of 2 would keep, written back in full
        out = p.detach().clone()
        out[p.shape[0] // 2:] = full[p.shape[0] // 2:]
        return out

    load_hf_weights(target, folder, local_part=second_half, log=lambda line: None)
    w, ref = target.layers[0].mlp.down_proj.weight, source.layers[0].mlp.down_proj.weight
    assert torch.equal(w[16:], ref[16:]) and not torch.equal(w[:16], ref[:16])


@pytest.mark.parametrize("change, needle", [
    (lambda t, c: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(65, 32)}),
     "tensor model.layers.1.mlp.up_proj.weight has shape [65, 32]"),
    (lambda t, c: t.pop("model.norm.weight"), "has no tensor model.norm.weight"),
    (lambda t, c: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}),
     "has tensor model.layers.2.mlp.up_proj.weight that this model does not have"),
    (lambda t, c: c.update({"rope_theta": 500000.0, "rope_parameters": {"rope_theta": 500000.0}}),
     "rope_theta=500000.0 but this run's model.rope_theta is 5000.0"),
])
def test_mismatching_folders_are_refused_naming_the_tensor(tmp_path, change, needle):
    torch.manual_seed(0)
    model = Llama(CFG)
    tensors, config = ours_as_hf(model), hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2)
    change(tensors, config)
    folder = write_folder(tmp_path / "hf", tensors, config)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError, match="model.init_from") as e:
        load_hf_weights(model, folder)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # checked before anything is written


def test_folders_without_weights_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="neither model.safetensors nor"):
        load_hf_weights(Llama(CFG), tmp_path / "empty")
    with pytest.raises(UserError, match="is not a directory"):
        load_hf_weights(Llama(CFG), tmp_path / "missing")


def test_plan_shards():
    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards([], 8) == []
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
