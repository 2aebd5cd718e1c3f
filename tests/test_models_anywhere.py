"""`model=` from anywhere: a preset, a YAML file, a Hugging Face config.json or checkpoint folder, the
trace's own record, with `model.FIELD=VALUE` on top (sim/machine/model_source.py, docs/models.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sim import bundled
from sim.cli import main as cli
from sim.config import parse_run_config
from sim.errors import UserError
from sim.machine.model_source import FAMILIES, load_model, trace_model
from sim.machine.models import PRESETS, load_preset
from sim.trace.format import read_trace, write_trace
from sim.trace.synthetic import random_trace, routing_trace

#: every field but the name and provenance
SIZES = [f.name for f in dataclasses.fields(PRESETS["mixtral-8x7b"]) if f.name not in ("name", "source")]
SHAPE = ["layers", "experts", "top_k", "hidden", "expert_width", "heads", "kv_heads", "head_dim", "vocab",
         "shared_experts", "shared_expert_width", "dense_layers", "dense_width", "expert_bias"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def ds25(tmp_path_factory) -> Path:
    """A routing log of a 25-layer, 64-expert, top-6 model (DeepSeek-V2-Lite with a layer cut)."""
    d = tmp_path_factory.mktemp("ds25") / "trace"
    write_trace(routing_trace(np.random.default_rng(0), tokens=10, layers=25, experts=64, top_k=6), d)
    return d


# ------------------------------------------------------------------------------------ preset names


def test_a_preset_name_is_the_preset_as_before():
    for name, p in PRESETS.items():
        assert load_model(name) == p == load_preset(name)
    assert load_preset("mixtral-8x7b", bits=4).bits == 4 and load_preset("mixtral-8x7b", bits=4).source == \
        PRESETS["mixtral-8x7b"].source  # quant.* is a quantisation of the same model: no note
    with pytest.raises(UserError, match="unknown model preset 'mixtral-9x9b'; known:"):
        load_model("mixtral-9x9b")
    with pytest.raises(UserError, match="model file or folder not found: my.yaml"):
        load_model("my.yaml")


def test_the_bundled_default_is_unchanged():
    cfg = parse_run_config([])
    assert cfg.model == "mixtral-8x7b" and cfg.model_overrides == {} and cfg.engine.staging_buffers == 6
    assert parse_run_config(["trace=toy"]).model == "mixtral-8x7b"


# ------------------------------------------------------------------------------------ model.FIELD=


def test_dotted_overrides_on_a_preset(ds25, tmp_path, capsys):
    rc, _, err = run(capsys, "run", f"trace={ds25}", "model=deepseek-v2-lite", f"out={tmp_path / 'x'}")
    assert rc == 2 and "does not match model preset 'deepseek-v2-lite'" in err and "model.layers=" in err
    out = tmp_path / "o"
    rc, stdout, err = run(capsys, "run", f"trace={ds25}", "model=deepseek-v2-lite", "model.layers=25",
                          "model.experts=64", f"out={out}", "report=false")
    assert rc == 0, err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "deepseek-v2-lite" and cfg["model_overrides"] == {"layers": 25, "experts": 64}
    model = cfg["resolved"]["model_preset"]  # the whole model, as run
    assert model["layers"] == 25 and model["hidden"] == 2048 and "model.layers=25" in model["source"]
    assert cfg["engine"]["staging_buffers"] == 12  # max(6, 2 x top-6)
    # the run's config.yaml runs again, and names its model as a model= file too
    summary = json.loads((out / "summary.json").read_text())
    for args in ([f"config={out / 'config.yaml'}"], [f"trace={ds25}", f"model={out / 'config.yaml'}"]):
        again = tmp_path / f"again{len(args)}"
        rc, _, err = run(capsys, "run", *args, f"out={again}", "report=false")
        assert rc == 0, err
        assert json.loads((again / "summary.json").read_text()) == summary


@pytest.mark.parametrize("args, message", [
    (["model.layers=0"], "bad value for 'model.layers': 0 (must be an integer >= 1"),
    (["model.layers=2.5"], "bad value for 'model.layers': 2.5 (must be a whole number"),
    (["model.heads=x"], "bad value for 'model.heads': 'x' (str)"),
    (["model.bits=0"], "bad value for 'model.bits': 0 (must be a number > 0"),
    (["model.foo=3"], "unknown model field(s) model.foo; valid: name, layers"),
    (["model.top_k=65"], "top_k=65 exceeds experts=64"),
    (["model.bits=4", "quant.bits=4"], "give model.bits or quant.bits, not both"),
])
def test_bad_overrides_name_the_field(ds25, tmp_path, capsys, args, message):
    rc, _, err = run(capsys, "run", f"trace={ds25}", "model=deepseek-v2-lite", "model.layers=25", *args,
                     f"out={tmp_path / 'o'}")
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_quant_keeps_working_beside_overrides(ds25):
    cfg = parse_run_config([f"trace={ds25}", "model=deepseek-v2-lite", "model.layers=25", "quant.bits=4",
                            "quant.group_size=64"])
    from sim.machine.model_source import run_model

    m = run_model(cfg, None)
    assert (m.layers, m.bits, m.group_size) == (25, 4, 64)


# ------------------------------------------------------------------------------------ YAML files


def _fields(name: str = "ds25") -> dict:
    d = dataclasses.asdict(PRESETS["deepseek-v2-lite"])
    d.pop("source")
    return {**d, "name": name, "layers": 25}


def test_a_yaml_file_of_model_fields(ds25, tmp_path, capsys):
    f = tmp_path / "ds25.yaml"
    f.write_text(yaml.safe_dump(_fields()))
    m = load_model(str(f))
    assert m.name == "ds25" and m.layers == 25 and m.source == "model file ds25.yaml"
    assert [getattr(m, k) for k in SIZES if k != "layers"] == \
        [getattr(PRESETS["deepseek-v2-lite"], k) for k in SIZES if k != "layers"]
    rc, _, err = run(capsys, "run", f"trace={ds25}", f"model={f}", f"out={tmp_path / 'o'}", "report=false")
    assert rc == 0, err


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown model field(s) bogus; valid:"),
    ({"layers": 0}, "bad value for 'layers': 0 (must be an integer >= 1"),
    ({"hidden": "2048"}, "bad value for 'hidden': '2048' (str)"),
    ({"expert_bias": 1}, "bad value for 'expert_bias': 1 (must be true or false)"),
    ({"name": 7}, "bad value for 'name': 7 (must be a string)"),
    ({"vocab": None}, "no vocab (not in m.yaml): give model.vocab=VALUE"),
    ({"shared_expert_width": 0}, "shared_experts=2 needs shared_expert_width > 0"),
])
def test_a_bad_yaml_file_names_the_field(tmp_path, change, message):
    data = {k: v for k, v in {**_fields(), **change}.items() if v is not None}
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_model(str(f))
    assert message in str(err.value) and str(f) in str(err.value)


def test_a_missing_field_may_come_from_an_override(tmp_path):
    data = _fields()
    data.pop("vocab")
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump(data))
    assert load_model(str(f), {"vocab": 1000}).vocab == 1000


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping of model fields"):
        load_model(str(f))
    f.write_text("a: [\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_model(str(f))


# ------------------------------------------------------------------------------------ config.json

#: the model-sizing keys of each shipped preset's own config.json (Hugging Face hub, transcribed)
CONFIGS = {
    "mixtral-8x7b": {"model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "torch_dtype": "bfloat16"},
    "mixtral-8x22b": {"model_type": "mixtral", "num_hidden_layers": 56, "num_local_experts": 8,
                      "num_experts_per_tok": 2, "hidden_size": 6144, "intermediate_size": 16384,
                      "num_attention_heads": 48, "num_key_value_heads": 8, "vocab_size": 32768,
                      "torch_dtype": "bfloat16"},
    "qwen1.5-moe-a2.7b": {"model_type": "qwen2_moe", "num_hidden_layers": 24, "num_experts": 60,
                          "num_experts_per_tok": 4, "hidden_size": 2048, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "intermediate_size": 5632,
                          "decoder_sparse_step": 1, "mlp_only_layers": [], "num_attention_heads": 16,
                          "num_key_value_heads": 16, "vocab_size": 151936, "torch_dtype": "bfloat16"},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128,
                      "num_experts_per_tok": 8, "hidden_size": 2048, "moe_intermediate_size": 768,
                      "intermediate_size": 6144, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "vocab_size": 151936, "torch_dtype": "bfloat16"},
    "olmoe-1b-7b": {"model_type": "olmoe", "num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8,
                    "hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16,
                    "num_key_value_heads": 16, "vocab_size": 50304, "torch_dtype": "bfloat16"},
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "num_hidden_layers": 27, "first_k_dense_replace": 1,
                         "moe_layer_freq": 1, "n_routed_experts": 64, "num_experts_per_tok": 6,
                         "moe_intermediate_size": 1408, "n_shared_experts": 2, "intermediate_size": 10944,
                         "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16,
                         "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512,
                         "vocab_size": 102400, "torch_dtype": "bfloat16"},
    "deepseek-v3": {"model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 3,
                    "moe_layer_freq": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
                    "moe_intermediate_size": 2048, "n_shared_experts": 1, "intermediate_size": 18432,
                    "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
                    "v_head_dim": 128, "vocab_size": 129280, "torch_dtype": "bfloat16",
                    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
    "phi-3.5-moe": {"model_type": "phimoe", "num_hidden_layers": 32, "num_local_experts": 16,
                    "num_experts_per_tok": 2, "hidden_size": 4096, "intermediate_size": 6400,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064,
                    "torch_dtype": "bfloat16"},
    "gpt-oss-20b": {"model_type": "gpt_oss", "num_hidden_layers": 24, "num_local_experts": 32,
                    "num_experts_per_tok": 4, "experts_per_token": 4, "hidden_size": 2880,
                    "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                    "vocab_size": 201088, "torch_dtype": "bfloat16",
                    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["attn"]}},
}


def _checkpoint(tmp_path: Path, name: str, config: dict) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("preset", sorted(CONFIGS))
def test_config_json_gives_each_presets_sizes(tmp_path, preset):
    d = _checkpoint(tmp_path, preset.upper(), CONFIGS[preset])
    for source in (d, d / "config.json"):  # a checkpoint folder, or its config.json
        m = load_model(str(source))
        want = PRESETS[preset]
        assert m.name == preset.upper() and "config.json" in m.source
        assert {k: getattr(m, k) for k in SHAPE} == {k: getattr(want, k) for k in SHAPE}
    if preset not in ("mixtral-8x7b",):  # its preset has AdapMoE's 2-bit HQQ experts, the checkpoint bf16
        assert (m.bits, m.attn_bits, m.group_size) == (want.bits, want.attn_bits, want.group_size), preset
    if preset == "deepseek-v2-lite":
        assert "1 dense decoder layer" in m.source and "MLA approximated" in m.source


def test_the_bundled_toy_checkpoint(capsys, tmp_path):
    m = load_model(str(bundled.models() / "toy-mixtral"))
    assert (m.layers, m.experts, m.top_k, m.hidden, m.expert_width, m.heads, m.kv_heads, m.head_dim, m.vocab,
            m.bits) == (32, 8, 2, 64, 64, 4, 2, 16, 256, 32.0)
    assert m.name == "toy-mixtral"


def test_qwen_dense_layers_are_counted_not_routed(tmp_path):
    cfg = {**CONFIGS["qwen3-30b-a3b"], "mlp_only_layers": [0, 1], "decoder_sparse_step": 2}
    m = load_model(str(_checkpoint(tmp_path, "q", cfg)))
    # 48 layers: odd indices are MoE (i + 1 even) except none listed -> 24; layers 0, 1 dense: 1 is odd -> 23
    assert (m.layers, m.dense_layers, m.dense_width) == (23, 25, 6144)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not a supported MoE family"),
    ({"num_key_value_heads": None}, "no kv_heads (num_key_value_heads is missing in config.json)"),
    ({"torch_dtype": None}, "no bits (config.json gives no torch_dtype)"),
    ({"torch_dtype": "int8"}, "its torch_dtype 'int8' is not one of"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq' is not read"),
    ({"num_hidden_layers": None}, "num_hidden_layers is missing"),
    ({"num_local_experts": 0}, "no experts (num_local_experts is 0 in config.json)"),
])
def test_a_config_json_it_cannot_read_says_why(tmp_path, change, message):
    cfg = {k: v for k, v in {**CONFIGS["mixtral-8x7b"], **change}.items() if v is not None}
    with pytest.raises(UserError) as err:
        load_model(str(_checkpoint(tmp_path, "m", cfg)))
    assert message in str(err.value)


def test_what_config_json_lacks_may_come_from_overrides(tmp_path):
    cfg = {k: v for k, v in CONFIGS["mixtral-8x7b"].items() if k != "torch_dtype"}
    d = _checkpoint(tmp_path, "m", cfg)
    with pytest.raises(UserError, match=r"give model.bits=VALUE \(and model.attn_bits\)"):
        load_model(str(d))
    assert load_model(str(d), {"bits": 16, "attn_bits": 16}).bits == 16


def test_a_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder without config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UserError, match="a model file is a .yaml"):
        load_model(str(tmp_path / "x.txt"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_model(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("preset, key, value", [
    ("qwen1.5-moe-a2.7b", "decoder_sparse_step", "x"),
    ("qwen1.5-moe-a2.7b", "decoder_sparse_step", 0),
    ("qwen1.5-moe-a2.7b", "mlp_only_layers", 3),
    ("qwen1.5-moe-a2.7b", "shared_expert_intermediate_size", "abc"),
    ("deepseek-v2-lite", "first_k_dense_replace", -1),
    ("deepseek-v2-lite", "moe_layer_freq", 1.5),
    ("deepseek-v2-lite", "n_shared_experts", "two"),
])
def test_bad_layer_and_shared_expert_keys_name_the_key(tmp_path, preset, key, value):
    """Not a traceback: the config.json key that is not a count is named, with its value."""
    d = _checkpoint(tmp_path, "m", {**CONFIGS[preset], key: value})
    with pytest.raises(UserError, match=f"config.json: {key} is"):
        load_model(str(d))


def test_the_families_are_the_tracers():
    pytest.importorskip("torch")
    from sim.tracer.families import FAMILIES as TRACED

    assert set(FAMILIES) == set(TRACED)


# ------------------------------------------------------------------------------------ without model=


def _trace_of(name: str, **kw):
    p = PRESETS.get(name)
    shape = dict(layers=p.layers, experts=p.experts, top_k=p.top_k) if p else {}
    shape.update(kw)
    return routing_trace(np.random.default_rng(0), tokens=4, name=name, **shape)


def test_a_trace_named_by_a_preset_of_its_shape_is_that_preset(tmp_path):
    write_trace(_trace_of("olmoe-1b-7b"), tmp_path / "t")
    cfg = parse_run_config([f"trace={tmp_path / 't'}"])
    assert cfg.model == "olmoe-1b-7b" and cfg.engine.staging_buffers == 16  # max(6, 2 x top-8)


def test_a_trace_of_no_preset_needs_model(tmp_path, capsys):
    write_trace(_trace_of("synthetic", layers=32, experts=8, top_k=2), tmp_path / "t")
    rc, _, err = run(capsys, "run", f"trace={tmp_path / 't'}", f"out={tmp_path / 'o'}")
    assert rc == 2 and "routes model 'synthetic' with (layers, experts, top_k) = (32, 8, 2)" in err
    assert "pass model=" in err and "presets of this shape: mixtral-8x7b" in err
    assert not (tmp_path / "o").exists()


def test_a_preset_name_of_another_shape_is_never_taken(tmp_path, capsys):
    write_trace(_trace_of("deepseek-v2-lite", layers=25), tmp_path / "t")
    rc, _, err = run(capsys, "run", f"trace={tmp_path / 't'}", f"out={tmp_path / 'o'}")
    assert rc == 2 and "preset 'deepseek-v2-lite' has (26, 64, 6)" in err
    cfg = parse_run_config([f"trace={tmp_path / 't'}", "model.layers=25"])  # the preset, fixed up
    assert cfg.model == "deepseek-v2-lite" and cfg.model_overrides == {"layers": 25}


def test_a_model_from_the_traces_record_and_overrides(tmp_path):
    tr = _trace_of("my-moe", layers=4, experts=8, top_k=2)
    tr.model = dataclasses.replace(tr.model, hidden=512, expert_width=1024, dtype="bfloat16")
    with pytest.raises(UserError, match="does not record heads, kv_heads, head_dim, vocab"):
        trace_model(tr)
    m, name = trace_model(tr, {"heads": 8, "kv_heads": 2, "head_dim": 64, "vocab": 1000})
    assert name == "" and (m.name, m.layers, m.hidden, m.expert_width, m.bits, m.kv_heads) == \
        ("my-moe", 4, 512, 1024, 16.0, 2)
    assert "meta.yaml" in m.source and "model.heads=8" in m.source


def test_an_imported_trace_remembers_its_model(tmp_path, capsys):
    tr = random_trace(np.random.default_rng(0), tokens=3, layers=25, experts=64, top_k=6, pregate_depth=0)
    log = tmp_path / "log.npz"
    np.savez(log, experts=tr.experts.astype(np.int64), weights=tr.weights)
    ckpt = _checkpoint(tmp_path, "DeepSeek-V2-Lite", CONFIGS["deepseek-v2-lite"])
    rc, _, err = run(capsys, "import", log, f"model={ckpt}", "model.layers=25", f"out={tmp_path / 'tr'}")
    assert rc == 0, err
    got = read_trace(tmp_path / "tr")
    assert got.model.name == "DeepSeek-V2-Lite" and got.source["model_preset"]["layers"] == 25
    m, name = trace_model(got)
    assert name == "" and m == load_model(str(ckpt), {"layers": 25})
    a, b = tmp_path / "a", tmp_path / "b"
    rc, _, err = run(capsys, "run", f"trace={tmp_path / 'tr'}", f"out={a}", "report=false")
    assert rc == 0, err
    rc, _, err = run(capsys, "run", f"trace={tmp_path / 'tr'}", f"model={ckpt}", "model.layers=25", f"out={b}",
                     "report=false")
    assert rc == 0, err
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    assert cfg["model"] == "" and cfg["resolved"]["model_preset"]["layers"] == 25


def test_import_refuses_a_model_it_cannot_size(tmp_path, capsys):
    tr = random_trace(np.random.default_rng(0), tokens=2, layers=4, experts=8, top_k=2, pregate_depth=0)
    np.savez(tmp_path / "log.npz", experts=tr.experts.astype(np.int64), weights=tr.weights)
    rc, _, err = run(capsys, "import", tmp_path / "log.npz", "model=mixtral-8x7b", "model.layers=x",
                     f"out={tmp_path / 'tr'}")
    assert rc == 2 and "bad value for 'model.layers': 'x'" in err
    rc, _, err = run(capsys, "import", tmp_path / "log.npz", "model=mixtral-8x7b", "model.layers=4",
                     f"out={tmp_path / 'tr'}")
    assert rc == 0, err


def test_trace_takes_a_checkpoint_only(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    rc, _, err = run(capsys, "trace", "model=mixtral-8x7b", f"text={text}", f"out={tmp_path / 'o'}")
    assert rc == 2 and "trace runs a checkpoint" in err
    d = _checkpoint(tmp_path, "llama", {**CONFIGS["mixtral-8x7b"], "model_type": "llama"})
    rc, _, err = run(capsys, "trace", f"model={d / 'config.json'}", f"text={text}", f"out={tmp_path / 'o'}")
    assert rc == 2 and "model_type 'llama' is not a supported MoE family" in err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_json_agrees_with_the_loaded_checkpoint(tmp_path, family):
    """json only, and what transformers builds from the same config.json (the tracer's tiny ones)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from sim.tracer import loader
    from sim.tracer.tiny import save_tiny

    d = save_tiny(tmp_path / family, family)
    loaded = loader.load(d)
    m, fam, first = load_model(str(d)), loaded.family, loaded.layers[0]
    assert (m.layers, m.dense_layers) == (len(loaded.layers), loaded.num_decoder_layers - len(loaded.layers))
    assert (m.experts, m.top_k, m.expert_width) == (fam.num_experts(first), fam.top_k(first), fam.expert_width(first))
    assert (m.shared_experts, m.shared_expert_width) == fam.shared_experts(loaded.config)
    assert (m.hidden, m.vocab, m.heads) == (loaded.config.hidden_size, loaded.config.vocab_size,
                                            loaded.config.num_attention_heads)
