"""Multi-tier data (issue 17): the storage-tier hardware profiles load and are consistent, and the
large-model presets match their models' published parameter counts."""

from __future__ import annotations

import json

import pytest

from sim.machine.hardware import PROFILES_DIR, load_profile
from sim.machine.model_source import load_model
from sim.machine.models import PRESETS, ModelPreset

#: the four profiles of issue 17's multi-tier runs
TIER_PROFILES = ("desktop-nvme", "workstation-h100-nvme", "apple-m-laptop", "jetson-agx-orin")
DISCRETE = ("desktop-nvme", "workstation-h100-nvme")
UNIFIED = ("apple-m-laptop", "jetson-agx-orin")
#: the links a storage -> host -> device hierarchy needs on a discrete GPU
DISCRETE_LINKS = {"storage_to_host", "host_to_device", "device_to_host", "storage_to_device"}


def routed_params(p: ModelPreset) -> int:
    """All routed experts' parameters: layers x experts x one expert's."""
    return p.layers * p.experts * p.expert_params


def non_expert_params(p: ModelPreset) -> float:
    """Resident non-expert parameters (attention, router, norms, shared and dense MLPs, embeddings)."""
    return p.non_expert_bytes * 8 / p.attn_bits


def total_params(p: ModelPreset) -> float:
    return routed_params(p) + non_expert_params(p)


def active_params(p: ModelPreset) -> float:
    """Parameters one token touches: top-k routed experts per layer plus everything non-routed."""
    return p.layers * p.top_k * p.expert_params + non_expert_params(p)


def routed_from_published(total: float, active: float, experts: int, top_k: int) -> float:
    """Routed-expert parameters implied by a published total and activated count.

    total = experts * X + R and active = top_k * X + R (X: one expert in every layer, R: the rest),
    so the routed experts are experts * X = experts / (experts - top_k) * (total - active)."""
    return experts / (experts - top_k) * (total - active)


# ------------------------------------------------------------------ profiles
@pytest.mark.parametrize("name", TIER_PROFILES)
def test_tier_profile_loads_with_experts_on_storage(name):
    p = load_profile(name)
    assert p.name == name and p.path == PROFILES_DIR / f"{name}.yaml"
    assert p.expert_tier == "storage"
    assert p.expert_link is p.links["storage_to_device"]
    assert p.host_memory_bytes > 0 and p.device_memory_bytes > 0
    assert 0 <= p.memory_reserve_bytes < p.device_memory_bytes
    for link in p.links.values():
        assert link.bandwidth_Bps > 0 and link.latency_s >= 0
        assert isinstance(link.channels, int) and link.channels >= 1
    assert all(s.strip() for s in p.sources.values())  # every number carries a source


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_profile_describes_every_hop(name):
    p = load_profile(name)
    assert not p.unified_memory
    assert set(p.links) == DISCRETE_LINKS
    assert p.host_memory_bytes > p.device_memory_bytes
    assert not any(link.shares_memory_bandwidth for link in p.links.values())


@pytest.mark.parametrize("name", DISCRETE)
def test_storage_to_device_is_the_two_hops_in_series(name):
    p = load_profile(name)
    direct, first, second = (p.links[k] for k in ("storage_to_device", "storage_to_host", "host_to_device"))
    assert direct.bandwidth_Bps <= first.bandwidth_Bps and direct.bandwidth_Bps <= second.bandwidth_Bps
    assert direct.bandwidth_Bps == pytest.approx(min(first.bandwidth_Bps, second.bandwidth_Bps))
    assert direct.latency_s == pytest.approx(first.latency_s + second.latency_s)
    assert direct.latency_s >= max(first.latency_s, second.latency_s)
    source = p.sources["links.storage_to_device.bandwidth_Bps"]
    assert source.startswith("derived:") and "series" in source


@pytest.mark.parametrize("name", UNIFIED)
def test_unified_profile_has_no_host_copy(name):
    p = load_profile(name)
    assert p.unified_memory
    assert set(p.links) == {"storage_to_device"}  # no host_to_device, device_to_host or storage_to_host
    assert p.expert_link.shares_memory_bandwidth  # the SSD's DMA lands in the memory compute reads
    assert p.host_memory_bytes == p.device_memory_bytes  # one pool


def test_readme_lists_the_tier_profiles():
    readme = (PROFILES_DIR / "README.md").read_text()
    section = readme.split("## Multi-tier profiles (issue 17)", 1)[1].split("\n## ", 1)[0]
    for name in TIER_PROFILES:
        assert f"`{name}`" in section, name


def test_faster_tiers_are_faster():
    """Sanity of the numbers: on every discrete profile NVMe < PCIe < device memory."""
    for name in DISCRETE:
        p = load_profile(name)
        assert p.links["storage_to_host"].bandwidth_Bps < p.links["host_to_device"].bandwidth_Bps
        assert p.links["host_to_device"].bandwidth_Bps < p.device.memory_bandwidth_Bps
    gen4, gen5 = load_profile("desktop-nvme"), load_profile("workstation-h100-nvme")
    assert gen5.links["storage_to_host"].bandwidth_Bps > gen4.links["storage_to_host"].bandwidth_Bps
    assert gen5.links["host_to_device"].bandwidth_Bps > gen4.links["host_to_device"].bandwidth_Bps


# ------------------------------------------------------------------ presets vs published counts
def test_qwen3_235b_preset_matches_its_model_card():
    p = PRESETS["qwen3-235b-a22b"]
    assert (p.layers, p.experts, p.top_k, p.hidden, p.expert_width) == (94, 128, 8, 4096, 1536)
    assert (p.heads, p.kv_heads, p.head_dim, p.vocab, p.bits, p.attn_bits) == (64, 4, 128, 151936, 16, 16)
    assert (p.shared_experts, p.dense_layers) == (0, 0)
    # model card: 235B total, 22B activated -> routed experts 128 / 120 x 213B = 227.2B
    published = routed_from_published(235e9, 22e9, p.experts, p.top_k)
    assert routed_params(p) == pytest.approx(published, rel=0.02)
    assert total_params(p) == pytest.approx(235e9, rel=0.02)
    assert active_params(p) == pytest.approx(22e9, rel=0.02)
    # at 16 bits the routed experts are ~454 GB: more than either tier host can hold
    assert routed_params(p) * p.bits / 8 > load_profile("workstation-h100-nvme").host_memory_bytes


def test_deepseek_v3_routed_experts_are_654b():
    p = PRESETS["deepseek-v3"]
    assert (p.layers, p.dense_layers, p.experts, p.top_k) == (58, 3, 256, 8)  # routed experts in 58 MoE layers
    assert routed_params(p) == pytest.approx(654e9, rel=0.02)
    # technical report: 671B total, 37B activated -> 256 / 248 x 634B = 654.5B routed
    assert routed_params(p) == pytest.approx(routed_from_published(671e9, 37e9, p.experts, p.top_k), rel=0.02)


def test_mixtral_8x22b_totals_are_141b():
    p = PRESETS["mixtral-8x22b"]
    assert total_params(p) == pytest.approx(141e9, rel=0.03)  # Mistral AI: 141B total
    assert active_params(p) == pytest.approx(39e9, rel=0.03)  # and 39B active
    assert routed_params(p) == 56 * 8 * 3 * 6144 * 16384


def test_qwen3_235b_config_json_gives_the_preset(tmp_path):
    """The checkpoint's config.json keys, read by the model loader, give the preset's shape."""
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 94, "num_experts": 128, "num_experts_per_tok": 8,
           "hidden_size": 4096, "moe_intermediate_size": 1536, "intermediate_size": 12288,
           "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
           "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16"}
    d = tmp_path / "Qwen3-235B-A22B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    m, want = load_model(str(d)), PRESETS["qwen3-235b-a22b"]
    shape = ("layers", "experts", "top_k", "hidden", "expert_width", "heads", "kv_heads", "head_dim", "vocab",
             "shared_experts", "dense_layers", "bits", "attn_bits")
    assert {k: getattr(m, k) for k in shape} == {k: getattr(want, k) for k in shape}
