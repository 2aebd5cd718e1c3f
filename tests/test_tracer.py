"""The tracer on a tiny random checkpoint of every supported family, checked independently.

Each test model is built offline (`sim.tracer.tiny`), traced through the CLI, read back with
`read_trace`, and compared with a separate teacher-forced forward pass whose MoE inputs are
captured by the test's own hooks: router outputs, pre-gating logits and greedy tokens must match.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sim.cli import main as cli  # noqa: E402
from sim.trace.format import read_trace  # noqa: E402
from sim.tracer.tiny import save_tiny  # noqa: E402

PROMPTS, PROMPT_TOKENS, DECODE = 3, 12, 4
TEXT = "".join(f"Line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs.\n" for i in range(60))

# family -> (moe layers, experts, top_k, moe_layer_ids, routing, renormalize, shared experts)
EXPECT = {
    "mixtral": (3, 4, 2, (0, 1, 2), "softmax_topk", True, 0),
    "qwen2_moe": (2, 4, 2, (1, 2), "softmax_topk", False, 1),
    "qwen3_moe": (2, 8, 4, (0, 1), "softmax_topk", True, 0),
    "olmoe": (2, 4, 2, (0, 1), "softmax_topk", False, 0),
    "deepseek_v2": (2, 8, 2, (1, 2), "softmax_grouped_topk", False, 1),
    "deepseek_v3": (2, 8, 2, (1, 2), "sigmoid_grouped_topk", True, 1),
    "gpt_oss": (2, 4, 2, (0, 1), "topk_softmax", True, 0),
    "phimoe": (2, 4, 2, (0, 1), "sparsemixer", False, 0),
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(TEXT)
    return p


_TRACED: dict[str, tuple] = {}


def _trace(family, tmp_path_factory, text_file):
    """Build and trace (twice) a tiny checkpoint of `family`; cached for the module."""
    if family in _TRACED:
        return _TRACED[family]
    root = tmp_path_factory.mktemp(family)
    model_dir = save_tiny(root / f"tiny-{family}", family, scale=5)
    args = [
        f"model={model_dir}",
        f"text={text_file}",
        f"prompts={PROMPTS}",
        f"prompt_tokens={PROMPT_TOKENS}",
        f"decode_tokens={DECODE}",
        "batch=2",
        "progress=false",
    ]
    assert cli(["trace", *args, f"out={root / 'a'}"]) == 0
    assert cli(["trace", *args, f"out={root / 'b'}"]) == 0
    _TRACED[family] = (family, model_dir, read_trace(root / "a"), read_trace(root / "b"))
    return _TRACED[family]


@pytest.fixture(scope="module", params=sorted(EXPECT))
def traced(request, tmp_path_factory, text_file):
    return _trace(request.param, tmp_path_factory, text_file)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, text_file):
    return _trace("mixtral", tmp_path_factory, text_file)


def _router(block):
    return block.router if hasattr(block, "router") else block.gate


def teacher_forced(model_dir, trace):
    """Logits [N, S, V] and MoE inputs {layer: [N, S, H]} of a plain full-sequence forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    blocks = [model.model.layers[i].mlp for i in trace.model.moe_layer_ids]
    xs = {}
    hooks = [
        b.register_forward_pre_hook(
            lambda m, a, kw, i=i: xs.__setitem__(i, a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
        for i, b in enumerate(blocks)
    ]
    tokens = torch.as_tensor(trace.token_id.reshape(PROMPTS, -1), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    for h in hooks:
        h.remove()
    return model, blocks, logits, xs


def test_shapes_and_meta(traced):
    family, _, trace, _ = traced
    L, E, k, ids, routing, renorm, shared = EXPECT[family]
    S = PROMPT_TOKENS + DECODE
    m = trace.model
    assert (m.layers, m.experts, m.top_k, m.moe_layer_ids, m.routing, m.renormalize) == (
        L,
        E,
        k,
        ids,
        routing,
        renorm,
    )
    assert m.shared_experts == shared
    assert m.dense_layers == max(ids) + 1 - L
    assert trace.experts.shape == (PROMPTS * S, L, k)
    assert trace.logits.shape == (PROMPTS * S, L, E)
    assert trace.fisher.shape == (PROMPTS * S, L)
    assert sorted(trace.pregate) == list(range(1, min(2, L - 1) + 1))
    assert trace.num_decode == PROMPTS * DECODE
    assert np.array_equal(trace.pos[:S], np.arange(S)) and np.array_equal(
        trace.is_decode[:S], np.arange(S) >= PROMPT_TOKENS
    )
    src = trace.source
    assert (
        src["checkpoint"] == f"tiny-{family}"
        and src["text"] == "corpus.txt"
        and len(src["text_sha256"]) == 64
    )
    assert (src["prompts"], src["prompt_tokens"], src["decode_tokens"], src["seed"]) == (
        PROMPTS,
        PROMPT_TOKENS,
        DECODE,
        0,
    )
    assert "/" not in src["checkpoint"]
    # weights in rank order, as routed
    assert np.all(np.diff(trace.weights, axis=-1) <= 0)
    if renorm and family != "deepseek_v3":
        assert np.allclose(trace.weights.sum(-1), 1, atol=1e-5)


def test_deterministic(traced):
    _, _, a, b = traced
    assert a.checksum() == b.checksum()


def test_routing_matches_the_model(traced):
    family, model_dir, trace, _ = traced
    model, blocks, _, xs = teacher_forced(model_dir, trace)
    H = trace.model.hidden
    mismatched = 0
    for layer, block in enumerate(blocks):
        x = xs[layer].reshape(-1, H)
        with torch.no_grad():
            logits, w, ids = _router(block)(x)
        w, order = torch.sort(w.float(), dim=-1, descending=True, stable=True)
        ids = ids.gather(-1, order)
        np.testing.assert_allclose(logits.float().numpy(), trace.logits[:, layer], atol=1e-5)
        same = (np.sort(ids.numpy(), -1) == np.sort(trace.experts[:, layer].astype(np.int64), -1)).all(-1)
        mismatched += int((~same).sum())
        np.testing.assert_allclose(w.numpy()[same], trace.weights[same, layer], atol=1e-5)
        assert np.array_equal(ids.numpy()[same], trace.experts[same, layer])
    assert mismatched <= 1, f"{family}: {mismatched} rows routed differently (near-ties allowed: 1)"


def test_pregate_is_next_router_on_this_input(traced):
    _, model_dir, trace, _ = traced
    _, blocks, _, xs = teacher_forced(model_dir, trace)
    L, H = trace.model.layers, trace.model.hidden
    for d, pre in trace.pregate.items():
        for layer in range(L):
            if layer + d >= L:
                assert not pre[:, layer].any()
                continue
            with torch.no_grad():
                want = _router(blocks[layer + d])(xs[layer].reshape(-1, H))[0].float().numpy()
            np.testing.assert_allclose(pre[:, layer], want, atol=1e-5)


def test_decode_is_greedy(traced):
    _, model_dir, trace, _ = traced
    _, _, logits, _ = teacher_forced(model_dir, trace)
    tokens = trace.token_id.reshape(PROMPTS, -1)
    for s in range(PROMPTS):
        for p in range(PROMPT_TOKENS - 1, tokens.shape[1] - 1):
            row = logits[s, p]
            assert row[tokens[s, p + 1]] >= row.max() - 1e-5, (s, p)


def test_fisher_finite_and_sensitivity(traced):
    _, _, trace, _ = traced
    assert np.all(np.isfinite(trace.fisher)) and np.all(trace.fisher >= 0)
    assert trace.fisher.max() > 0
    np.testing.assert_allclose(trace.sensitivity, trace.fisher.astype(np.float64).mean(0), rtol=1e-5)
    info = trace.sensitivity_info
    assert info["tokens"] == trace.num_tokens and "g_i^2" in info["definition"] and "nats" in info["loss"]


def test_fisher_by_hand_mixtral(mixtral):
    """Recompute fisher for a few rows of Mixtral by hand: own gradient tap, own expert maths."""
    _, model_dir, trace, _ = mixtral
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = torch.as_tensor(trace.token_id.reshape(PROMPTS, -1), dtype=torch.long)
    S = tokens.shape[1]
    with torch.no_grad():  # the last position's target is the greedy next token
        last = model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)
    targets = torch.cat([tokens[:, 1:], last], 1)
    for layer in range(trace.model.layers):
        block = model.model.layers[trace.model.moe_layer_ids[layer]].mlp
        box = {}

        def pre(m, a, box=box):
            box["x"] = a[0].detach()

        def post(m, a, out, box=box):
            box["y"] = out.detach().requires_grad_(True)
            return box["y"]

        h1, h2 = block.register_forward_pre_hook(pre), block.register_forward_hook(post)
        logits = model(input_ids=tokens).logits
        logp = torch.log_softmax(logits.float(), -1)
        nll = -logp.gather(-1, targets[:, :, None]).sum()  # summed NLL of all sequences, nats
        h1.remove(), h2.remove()
        (g,) = torch.autograd.grad(nll, [box["y"]])
        ex = block.experts
        for s, p in [(0, 2), (1, S - 3), (2, PROMPT_TOKENS), (0, S - 1)]:
            t = s * S + p
            x = box["x"][s, p]

            def E(i, x=x, ex=ex):
                gate, up = (ex.gate_up_proj[i] @ x).chunk(2)
                return ex.down_proj[i] @ (torch.nn.functional.silu(gate) * up)

            e1, ek = int(trace.experts[t, layer, 0]), int(trace.experts[t, layer, -1])
            want = float((g[s, p] ** 2 * (E(e1) - E(ek)) ** 2).sum())
            assert float(trace.fisher[t, layer]) == pytest.approx(want, rel=1e-3, abs=1e-10), (layer, s, p)


BAD = [
    "no_model",
    "not_checkpoint",
    "dense",
    "no_text",
    "empty_text",
    "short_text",
    "too_long",
    "dtype",
    "cuda",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(case, tmp_path, capsys, text_file):
    model = tmp_path / "m"
    text = text_file
    extra = []
    if case == "dense":
        save_tiny(model, "llama")
    elif case == "not_checkpoint":
        model.mkdir()
        (model / "weights.bin").write_bytes(b"x")
    elif case != "no_model":
        save_tiny(model, "mixtral")
    if case == "no_text":
        text = tmp_path / "missing.txt"
    elif case == "empty_text":
        text = tmp_path / "empty.txt"
        text.write_text("  \n")
    elif case == "short_text":
        text = tmp_path / "short.txt"
        text.write_text("too short")
    elif case == "too_long":
        extra = ["decode_tokens=600"]  # tiny models: max_position_embeddings = 512
    elif case == "dtype":
        extra = ["dtype=int8"]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        extra = ["device=cuda"]
    capsys.readouterr()
    out = tmp_path / "out"
    rc = cli(
        [
            "trace",
            f"model={model}",
            f"text={text}",
            f"out={out}",
            "prompts=2",
            "prompt_tokens=16",
            "progress=false",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
