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
    # values that change the function while every shape still matches (issue 32, item 9)
    (lambda t, c: c.update({"num_attention_heads": 2, "head_dim": None}),
     "num_attention_heads=2 but this run's model.n_heads is 4; set model.n_heads=2"),
    (lambda t, c: c.update({"num_key_value_heads": 2}), "num_key_value_heads=2 of 4 heads"),
    (lambda t, c: c.update({"head_dim": 16}), "head_dim=16 but this model's is model.dim / model.n_heads = 8"),
    (lambda t, c: c.update({"hidden_act": "gelu"}), "hidden_act=gelu but this model's MLP uses silu"),
    (lambda t, c: c.update({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
     'rope_scaling={"rope_type": "llama3", "factor": 8.0}'),
    (lambda t, c: c.update({"rope_scaling": {"type": "linear", "factor": 2.0}}), 'rope_scaling={"type": "linear"'),
    (lambda t, c: c.update({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0}}),
     'rope_parameters={"rope_type": "yarn"'),
    (lambda t, c: c.update({"partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (lambda t, c: [c.pop("rope_theta"), c.pop("rope_parameters")],
     "rope_theta=10000.0 (by default) but this run's model.rope_theta is 5000.0"),
    (lambda t, c: c.update({"rms_norm_eps": 1e-6}), "rms_norm_eps=1e-06 but this run's model.norm_eps is 1e-05"),
    (lambda t, c: c.update({"attention_bias": True}), "attention_bias=true"),
    (lambda t, c: c.update({"mlp_bias": True}), "mlp_bias=true"),
    (lambda t, c: c.update({"model_type": "mistral"}), "model_type=mistral"),
    (lambda t, c: c.update({"tie_word_embeddings": True}),
     "tie_word_embeddings=true but its lm_head.weight differs from model.embed_tokens.weight"),
    (lambda t, c: c.update({"num_attention_heads": "four"}), "config.json has a malformed value (ValueError"),
    # weights that are not floating point: quantized or mistaken folders
    (lambda t, c: t.update({"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 32, dtype=torch.int8)}),
     "tensor model.layers.0.self_attn.q_proj.weight in"),
    (lambda t, c: t.update({"model.norm.weight": torch.ones(32, dtype=torch.bool)}), "has dtype BOOL"),
    (lambda t, c: t.update({"lm_head.weight": torch.ones(96, 32, dtype=torch.int32)}), "has dtype I32"),
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


def test_transformers_config_defaults_and_scaling_free_rope_are_accepted(tmp_path):
    """Keys a config.json may omit or write as null/default take transformers' defaults (what it would compute)."""
    cfg = LlamaConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=64)  # rope 1e4, eps 1e-6
    torch.manual_seed(0)
    model = Llama(cfg)
    config = {"hidden_size": 32, "num_attention_heads": 4, "rope_scaling": {"rope_type": "default"},
              "num_key_value_heads": None, "hidden_act": "swish"}
    tied = ours_as_hf(model)
    tied["lm_head.weight"] = tied["model.embed_tokens.weight"].clone()  # tied and saved twice, the same values
    target = Llama(cfg)
    load_hf_weights(target, write_folder(tmp_path / "hf", tied, {**config, "tie_word_embeddings": True}),
                    log=lambda line: None)
    assert torch.equal(target.lm_head.weight, model.embed_tokens.weight)
    assert torch.equal(target.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)
    half = {n: t.to(torch.bfloat16) for n, t in ours_as_hf(model).items()}  # any floating dtype is read
    load_hf_weights(target, write_folder(tmp_path / "bf16", half, config), log=lambda line: None)
    assert torch.equal(target.norm.weight, model.norm.weight)


@pytest.mark.parametrize("file, text, needle", [
    ("config.json", "[1, 2]", "config.json holds a JSON list, not an object"),
    ("config.json", '"llama"', "config.json holds a JSON str, not an object"),
    ("config.json", "{", "config.json cannot be read (JSONDecodeError"),
    (INDEX_FILE, '{"weight_map": ', f"{INDEX_FILE} cannot be read (JSONDecodeError"),
    (INDEX_FILE, "[]", f"{INDEX_FILE} holds a JSON list, not an object"),
    (INDEX_FILE, '{"metadata": {}}', f'{INDEX_FILE} has no "weight_map" object'),
    (INDEX_FILE, '{"weight_map": ["model.safetensors"]}', f'{INDEX_FILE} has no "weight_map" object'),
    (INDEX_FILE, '{"weight_map": {"lm_head.weight": 3}}', f'{INDEX_FILE} has no "weight_map" object'),
])
def test_broken_config_or_index_json_is_refused_in_one_line(tmp_path, file, text, needle):
    model = Llama(CFG)
    folder = write_folder(tmp_path / "hf", ours_as_hf(model), hf_config(CFG, dtype=torch.float32, bos_id=1, eos_id=2))
    (folder / file).write_text(text)
    with pytest.raises(UserError) as e:
        load_hf_weights(model, folder)
    assert needle in str(e.value) and "model.init_from" in str(e.value) and "\n" not in str(e.value)


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
