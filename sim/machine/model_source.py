"""Where a run's model comes from: `model=` and `model.FIELD=VALUE` (docs/models.md).

A model is a `ModelPreset` (`sim/machine/models.py`): the sizes of the experts and of the rest.
`model=` names one of:

    a preset name           model=deepseek-v2-lite            (python -m sim list)
    a YAML file             model=my-model.yaml               ModelPreset fields, as a mapping; or a
                                                              run's config.yaml: the model that run used
    a Hugging Face config   model=ckpt/config.json            read with `json` (no transformers), for
    or checkpoint folder    model=ckpt                        the families the tracer supports
    nothing (the default)                                     the trace's own model (`trace_model`)

and `model.FIELD=VALUE` (the run's `model_overrides`) sets fields on top: `model=deepseek-v2-lite
model.layers=25`. Every field is checked (`sim.validate.MODEL_FIELDS`); an unknown field or a bad
value is a UserError naming the field, and so is a field no source gives. `quant.bits|group_size|
scale_bits` set the same fields as `model.bits|...`; giving both for one field is refused.

Without `model=`, the trace decides (`trace_model`):
  1. a trace whose meta.yaml names a preset to replay it as (`source.replay_model`) uses it: the
     bundled `traces/toy` says `mixtral-8x7b` (the project's headline configuration, the toy
     model's real routing with Mixtral-8x7B's expert sizes), wherever it is copied;
  2. a trace that records the whole model it was made for (`meta.yaml: source.model_preset`,
     written by `python -m sim import`) uses that model;
  3. a trace whose `model.name` is a preset of its routing shape (layers, experts, top-k) uses it;
  4. else the model is built from the trace's `model` section (layers, experts, top_k, hidden,
     expert_width, shared and dense layers, dtype -> bits) and the `model.FIELD=` given, when
     together they hold every field (a trace never records heads, kv_heads, head_dim, vocab);
  5. else a UserError saying to pass `model=` (it lists the presets of the trace's shape).
Nothing is guessed: a preset of another shape, or of the same shape under another name, is never
taken for a trace's model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.errors import UserError
from sim.machine.models import PRESETS, ModelPreset

#: a trace's `meta.yaml` key `source.replay_model`: the preset it is replayed as without `model=`,
#: when that is not its own model (the bundled `traces/toy` is the toy model's routing replayed with
#: Mixtral-8x7B's sizes: README "Figures measured here"). It travels with the trace (a copy, a
#: subset of its sequences), so where a trace lives never decides its model.
REPLAY_MODEL = "replay_model"

FIELDS = tuple(f.name for f in dataclasses.fields(ModelPreset))
#: the fields a model needs (no default in ModelPreset)
REQUIRED = tuple(f.name for f in dataclasses.fields(ModelPreset) if f.default is dataclasses.MISSING)
#: `dtype` / `torch_dtype` of a config.json or a trace -> bits per weight
DTYPE_BITS = {"float32": 32.0, "float16": 16.0, "bfloat16": 16.0, "float64": 64.0}

Why = dict[str, str]  # field -> why the source does not give it


# ------------------------------------------------------------------------ checking fields


def check_fields(data: dict[str, Any], where: str, *, section: str = "") -> dict[str, Any]:
    """`data` (field -> value) checked against ModelPreset: no unknown field, every value of its
    type and in range (`sim.validate.MODEL_FIELDS`). `section` prefixes the names in messages."""
    from sim.validate import MODEL_FIELDS, check_record

    prefix, at = (f"{section}." if section else ""), (f"{where}: " if where else "")
    unknown = sorted(set(map(str, data)) - set(FIELDS))
    if unknown:
        raise UserError(f"{at}unknown model field(s) {', '.join(prefix + u for u in unknown)}; "
                        f"valid: {', '.join(FIELDS)}")
    try:
        values = check_record(ModelPreset, data, MODEL_FIELDS, where, section=section)
    except UserError as err:  # check_record puts "where: " first, also for an empty where
        raise UserError(str(err).removeprefix(": ")) from None
    if "name" in values and not values["name"].strip():
        raise UserError(f"{at}bad value for {prefix + 'name'!r}: a model's name must not be empty")
    return values


def build(values: dict[str, Any], where: str) -> ModelPreset:
    """A ModelPreset from checked fields, with the checks that span fields."""
    m = ModelPreset(**values)
    if m.top_k > m.experts:
        raise UserError(f"{where}: top_k={m.top_k} exceeds experts={m.experts}")
    if m.shared_experts and not m.shared_expert_width:
        raise UserError(f"{where}: shared_experts={m.shared_experts} needs shared_expert_width > 0")
    if m.dense_layers and not m.dense_width:
        raise UserError(f"{where}: dense_layers={m.dense_layers} needs dense_width > 0")
    return m


def _left(values: dict[str, Any], why: Why) -> Why:
    """The fields a model still needs: those the source could not give, then any required one."""
    left = {k: w for k, w in why.items() if k not in values}
    left.update({k: "missing" for k in REQUIRED if k not in values and k not in left})
    return left


def complete(values: dict[str, Any], why: Why, overrides: dict[str, Any] | None, quant: dict[str, Any] | None,
             where: str, missing_message: Callable[[Why], str] | None = None, quant_key: str = "quant") -> ModelPreset:
    """The model of a source's `values` with `model.FIELD=` overrides and `quant.*` on top.

    `why`: the fields the source cannot give and why; each must come from the overrides.
    The overrides are noted in the model's `source`; `quant.*` is not (as before: a quantisation
    of the same model). `quant_key`: how messages name the `quant` fields."""
    over = check_fields(dict(overrides or {}), "", section="model") if overrides else {}
    q = {k: v for k, v in (quant or {}).items() if v is not None}
    q = check_fields(q, "", section=quant_key) if q else {}
    both = sorted(set(over) & set(q))
    if both:
        raise UserError(f"give model.{both[0]} or {quant_key}.{both[0]}, not both")
    merged = {**values, **over, **q}
    left = _left(merged, why)
    if left:
        if missing_message is not None:
            raise UserError(missing_message(left))
        first, reason = next(iter(left.items()))
        more = f" (and {', '.join('model.' + k for k in list(left)[1:])})" if len(left) > 1 else ""
        raise UserError(f"{where}: no {first} ({reason}): give model.{first}=VALUE{more}")
    if over and "source" not in over:
        told = " ".join(f"model.{k}={v}" for k, v in over.items())
        merged["source"] = f"{values.get('source')}; {told}" if values.get("source") else told
    return build(merged, where)


# ------------------------------------------------------------------------ model= sources


def load_model(source: str, overrides: dict[str, Any] | None = None,
               quant: dict[str, Any] | None = None) -> ModelPreset:
    """The model `model=source` names (a preset, a YAML file, a config.json or a checkpoint
    folder), with `model.FIELD=` overrides and `quant.*` on top. UserError for anything else."""
    values, why, where = source_fields(source)
    return complete(values, why, overrides, quant, where)


def source_fields(source: str) -> tuple[dict[str, Any], Why, str]:
    """(the fields `model=source` gives, the fields it cannot give and why, where: for messages)."""
    if not isinstance(source, str) or not source:
        raise UserError("model= is empty: give a preset name, a model YAML file, a config.json or a checkpoint "
                        f"folder (presets: {', '.join(sorted(PRESETS))})")
    if source in PRESETS:
        return dataclasses.asdict(PRESETS[source]), {}, f"model={source}"
    path = Path(source)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:  # a name too long for the file system
        is_dir = is_file = False
    if is_dir:
        if (path / "config.json").is_file():
            return config_json_fields(path / "config.json")
        raise UserError(f"model={source} is a folder without config.json (not a Hugging Face checkpoint)")
    if is_file:
        if path.suffix.lower() == ".json":
            return config_json_fields(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            return yaml_fields(path)
        raise UserError(f"model={source}: a model file is a .yaml of model fields or a Hugging Face config.json")
    if "/" in source or source.endswith((".yaml", ".yml", ".json")):
        raise UserError(f"model file or folder not found: {source}")
    raise UserError(f"unknown model preset {source!r}; known: {', '.join(sorted(PRESETS))} "
                    "(or give a model YAML file, a config.json or a checkpoint folder)")


def yaml_fields(path: Path) -> tuple[dict[str, Any], Why, str]:
    """A YAML mapping of ModelPreset fields, or a run's `config.yaml` (its `resolved.model_preset`)."""

    from sim.errors import read_yaml_mapping

    data = read_yaml_mapping(path, "model file", f"model fields ({', '.join(REQUIRED)}, ...)")
    resolved = data.get("resolved")
    if isinstance(resolved, dict) and isinstance(resolved.get("model_preset"), dict):
        data, where = resolved["model_preset"], f"{path}: resolved.model_preset"  # a run's config.yaml
    else:
        where = str(path)
    values = check_fields(data, where)
    values.setdefault("source", f"model file {path.name}")
    return values, {k: f"not in {path.name}" for k in REQUIRED if k not in values}, where


# ------------------------------------------------------------------------ Hugging Face config.json


def _count(c: dict[str, Any], key: str, default: int, lo: int = 0) -> int:
    """`c[key]` as a whole number >= `lo` (`default` when absent or null); UserError naming the key."""
    v = c.get(key)
    if v is None:
        return default
    if not _whole(v) or v < lo:
        raise UserError(f"config.json: {key} is {v!r}; expected a whole number >= {lo}")
    return v


def _moe_all(c: dict[str, Any], n: int) -> list[bool]:
    return [True] * n


def _moe_qwen(c: dict[str, Any], n: int) -> list[bool]:
    """transformers' Qwen2-MoE / Qwen3-MoE: layer i is MoE unless listed in `mlp_only_layers`, and
    then only when (i + 1) is a multiple of `decoder_sparse_step` (default 1)."""
    only = c.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(_whole(i) for i in only):
        raise UserError(f"config.json: mlp_only_layers is {only!r}; expected a list of layer numbers")
    only = set(only)
    step = _count(c, "decoder_sparse_step", 1, lo=1)
    return [i not in only and (i + 1) % step == 0 for i in range(n)]


def _moe_deepseek(c: dict[str, Any], n: int) -> list[bool]:
    """DeepSeek-V2/V3: the first `first_k_dense_replace` layers are dense, then layer i is MoE when
    it is a multiple of `moe_layer_freq` (default 1)."""
    first = _count(c, "first_k_dense_replace", 0)
    freq = _count(c, "moe_layer_freq", 1, lo=1)
    return [i >= first and i % freq == 0 for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one `model_type`'s config.json names a model's fields."""

    experts: str | tuple[str, ...]  # key (or keys: the first present): routed experts per MoE layer
    expert_width: str  # key: intermediate size of one routed expert
    moe_layers: Callable[[dict[str, Any], int], list[bool]] = _moe_all  # which decoder layers are MoE
    shared: str = "none"  # none | qwen (one of `shared_expert_intermediate_size`) | deepseek (n x expert width)
    expert_bias: bool = False  # the family's experts carry biases
    head_dim: str = "head_dim"  # key; absent or null: hidden_size / num_attention_heads, as transformers does
    note: str = ""


#: the families `python -m sim trace` supports (`sim/tracer/families`), by config.json `model_type`
FAMILIES: dict[str, Family] = {
    "mixtral": Family("num_local_experts", "intermediate_size"),
    "phimoe": Family("num_local_experts", "intermediate_size"),
    "gpt_oss": Family("num_local_experts", "intermediate_size", expert_bias=True),
    # the hub's config.json of these says num_experts; transformers 5 may write num_local_experts
    "olmoe": Family(("num_experts", "num_local_experts"), "intermediate_size"),
    "qwen2_moe": Family(("num_experts", "num_local_experts"), "moe_intermediate_size", _moe_qwen, shared="qwen"),
    "qwen3_moe": Family(("num_experts", "num_local_experts"), "moe_intermediate_size", _moe_qwen),
    "deepseek_v2": Family("n_routed_experts", "moe_intermediate_size", _moe_deepseek, shared="deepseek",
                          head_dim="v_head_dim", note="MLA approximated as MHA with head_dim = v_head_dim"),
    "deepseek_v3": Family("n_routed_experts", "moe_intermediate_size", _moe_deepseek, shared="deepseek",
                          head_dim="v_head_dim", note="MLA approximated as MHA with head_dim = v_head_dim"),
}

#: `quantization_config.quant_method` -> (bits per routed-expert weight, bits per other weight;
#: None: the checkpoint's dtype)
QUANT_METHODS: dict[str, tuple[float, float | None]] = {
    "mxfp4": (4.25, None),  # gpt-oss: MXFP4 experts (4 bits + one 8-bit scale per 32), the rest in dtype
    "fp8": (8.0, 8.0),  # DeepSeek-V3: every linear weight in FP8 (its block scales are negligible)
}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_json_fields(path: Path) -> tuple[dict[str, Any], Why, str]:
    """(the model fields a Hugging Face config.json gives, the ones it cannot and why, where).

    Read with `json` only. Layers are the MoE layers; the dense decoder layers (DeepSeek's
    `first_k_dense_replace`, Qwen's `mlp_only_layers` / `decoder_sparse_step`) are counted in
    `dense_layers` with `intermediate_size` as their width. UserError for a file that is not JSON
    or not of a supported family (naming its `model_type`)."""
    from sim.errors import read_text

    where = str(path)
    text = read_text(path, "config.json")
    try:
        c = json.loads(text)
    except ValueError as err:
        raise UserError(f"{where} is not valid JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(c, dict):
        raise UserError(f"{where}: a config.json holds a mapping")
    model_type = c.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{where}: model_type {model_type!r} is not a supported MoE family (supported: "
                        f"{', '.join(sorted(FAMILIES))}); describe the model in a YAML file instead (docs/models.md)")
    fam = FAMILIES[model_type]
    why: Why = {}
    values: dict[str, Any] = {"name": path.resolve().parent.name or model_type, "expert_bias": fam.expert_bias}

    def take(field: str, keys: str | tuple[str, ...]) -> None:
        keys = (keys,) if isinstance(keys, str) else keys
        key = next((k for k in keys if c.get(k) is not None), keys[0])
        if _whole(c.get(key)) and c[key] > 0:
            values[field] = c[key]
        else:
            why[field] = f"{key} is {'missing' if c.get(key) is None else repr(c[key])} in config.json"

    take("experts", fam.experts)
    take("top_k", "experts_per_token" if "num_experts_per_tok" not in c and "experts_per_token" in c
         else "num_experts_per_tok")
    take("hidden", "hidden_size")
    take("expert_width", fam.expert_width)
    take("heads", "num_attention_heads")
    take("kv_heads", "num_key_value_heads")
    take("vocab", "vocab_size")
    if c.get(fam.head_dim) is None and fam.head_dim == "head_dim" and "hidden" in values and "heads" in values:
        values["head_dim"] = values["hidden"] // values["heads"]  # transformers' rule for an absent head_dim
    else:
        take("head_dim", fam.head_dim)
    n = c.get("num_hidden_layers")
    if not (_whole(n) and n > 0):
        raise UserError(f"{where}: num_hidden_layers is {'missing' if n is None else repr(n)}; "
                        "a config.json of an MoE model gives its decoder layers")
    moe = fam.moe_layers(c, n)
    values["layers"] = sum(moe)
    if not values["layers"]:
        raise UserError(f"{where}: this {model_type} config has no MoE layer")
    dense = n - values["layers"]
    if dense:
        values["dense_layers"] = dense
        take("dense_width", "intermediate_size")
    if fam.shared == "qwen" and _count(c, "shared_expert_intermediate_size", 0) > 0:
        values["shared_experts"], values["shared_expert_width"] = 1, c["shared_expert_intermediate_size"]
    elif fam.shared == "deepseek" and _count(c, "n_shared_experts", 0) > 0 and "expert_width" in values:
        values["shared_experts"], values["shared_expert_width"] = c["n_shared_experts"], values["expert_width"]
    dtype = c.get("torch_dtype", c.get("dtype"))
    dtype_bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    no_dtype = (f"its torch_dtype {dtype!r} is not one of {', '.join(DTYPE_BITS)}" if dtype is not None
                else "config.json gives no torch_dtype")
    quant = c.get("quantization_config")
    if isinstance(quant, dict):
        method = quant.get("quant_method")
        if method in QUANT_METHODS:
            values["bits"], other = QUANT_METHODS[method]
            if other is not None:
                values["attn_bits"] = other
            elif dtype_bits is not None:
                values["attn_bits"] = dtype_bits
            else:
                why["attn_bits"] = no_dtype
        else:
            why["bits"] = why["attn_bits"] = (f"quantization_config.quant_method {method!r} is not read (known: "
                                              f"{', '.join(QUANT_METHODS)}; give model.group_size= too if it has groups)")
    elif dtype_bits is not None:
        values["bits"] = values["attn_bits"] = dtype_bits
    else:
        why["bits"] = why["attn_bits"] = no_dtype
    notes = [f"config.json of {values['name']} ({model_type})", fam.note,
             f"{dense} dense decoder layer(s) beside the MoE ones" if dense else ""]
    values["source"] = "; ".join(x for x in notes if x)
    return check_fields(values, where), why, where


# ------------------------------------------------------------------------ the trace's own model


def replay_model(source: dict[str, Any] | None, where: str) -> str | None:
    """The preset a trace's `source.replay_model` names (None if it names none); UserError if it
    names no preset."""
    name = (source or {}).get(REPLAY_MODEL)
    if name is None:
        return None
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"{where}: meta.yaml source.{REPLAY_MODEL}={name!r} is not a model preset; "
                        f"known: {', '.join(sorted(PRESETS))}")
    return name


def replay_model_of(folder: Path | str) -> str | None:
    """`replay_model` of a trace folder, read from its meta.yaml alone (the routing is not loaded);
    None when the folder has no readable meta.yaml (the run that loads it reports that)."""
    import yaml

    try:
        meta = yaml.safe_load((Path(folder) / "meta.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    source = meta.get("source") if isinstance(meta, dict) else None
    return replay_model(source if isinstance(source, dict) else None, f"trace {folder}")


def shape_of(m: Any) -> tuple[int, int, int]:
    """(layers, experts, top_k) of a ModelPreset or a trace's ModelInfo."""
    return int(m.layers), int(m.experts), int(m.top_k)


def presets_of_shape(shape: tuple[int, int, int]) -> list[str]:
    return sorted(n for n, p in PRESETS.items() if shape_of(p) == shape)


def trace_model(trace: Any, overrides: dict[str, Any] | None = None,
                quant: dict[str, Any] | None = None) -> tuple[ModelPreset, str]:
    """(the model of `trace` when `model=` is not given, the `model=` value that names it: a preset
    name, or "" when the model is the trace's own record). The rules: the module docstring."""
    info = trace.model
    shape = shape_of(info)
    path = getattr(trace, "path", None)
    where = f"trace {path}" if path is not None else f"the trace of {info.name!r}"
    default = replay_model(getattr(trace, "source", None), where)
    if default is not None:
        if shape_of(PRESETS[default]) != shape:
            raise UserError(f"{where}: meta.yaml source.{REPLAY_MODEL}={default} has (layers, experts, top_k) = "
                            f"{shape_of(PRESETS[default])}, the routing {shape}")
        return load_model(default, overrides, quant), default
    recorded = (getattr(trace, "source", None) or {}).get("model_preset")
    if recorded is not None:
        at = f"{where}: meta.yaml source.model_preset"
        if not isinstance(recorded, dict):
            raise UserError(f"{at} must be a mapping of model fields")
        m = complete(check_fields(recorded, at), {}, None, None, at)
        if shape_of(m) != shape:
            raise UserError(f"{at} has (layers, experts, top_k) = {shape_of(m)}, its routing {shape}")
        name = m.name if PRESETS.get(m.name) == m else ""
        return complete(dataclasses.asdict(m), {}, overrides, quant, at), name
    if info.name in PRESETS:
        m = load_model(info.name, overrides, quant)
        if shape_of(m) == shape:
            return m, info.name
    values: dict[str, Any] = {"name": info.name, "layers": info.layers, "experts": info.experts, "top_k": info.top_k,
                              "shared_experts": info.shared_experts, "shared_expert_width": info.shared_expert_width,
                              "dense_layers": info.dense_layers,
                              "source": f"the model section of the trace's meta.yaml ({info.name})"}
    why: Why = {k: "a trace does not record it" for k in ("heads", "kv_heads", "head_dim", "vocab")}
    for field in ("hidden", "expert_width"):
        if getattr(info, field):
            values[field] = getattr(info, field)
        else:
            why[field] = "the trace does not record it"
    if info.dtype in DTYPE_BITS:
        values["bits"] = values["attn_bits"] = DTYPE_BITS[info.dtype]
    else:
        why["bits"] = why["attn_bits"] = f"the trace's dtype is {info.dtype!r}"
    if info.dense_layers:
        why["dense_width"] = "the trace does not record it"

    def message(left: Why) -> str:
        if info.name in PRESETS:
            why_not = f"preset {info.name!r} has {shape_of(PRESETS[info.name])}"
        else:
            why_not = "which is not a model preset"
        same = presets_of_shape(shape)
        hint = f"presets of this shape: {', '.join(same)}" if same else "no preset has this shape"
        return (f"{where} routes model {info.name!r} with (layers, experts, top_k) = {shape}, {why_not}, and "
                f"does not record {', '.join(left)}: pass model=PRESET, a model YAML file or a config.json "
                f"({hint}), or the missing fields as model.FIELD=VALUE")

    return complete(values, why, overrides, quant, where, missing_message=message), ""


def run_model(cfg: Any, trace: Any) -> ModelPreset:
    """The model a run of `cfg` uses on `trace`: `model=` with `model.*` and `quant.*` on top, or,
    without `model=`, the trace's own (`trace_model`)."""
    quant = dataclasses.asdict(cfg.quant)
    overrides = dict(getattr(cfg, "model_overrides", None) or {})
    if cfg.model:
        return load_model(cfg.model, overrides, quant)
    return trace_model(trace, overrides, quant)[0]
