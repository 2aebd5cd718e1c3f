"""`sim fisher-check` on a tiny Mixtral: the JSON report, and one measured change recomputed directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sim.cli import main as cli  # noqa: E402
from sim.tracer.tiny import save_tiny  # noqa: E402

TEXT = "".join(f"Row {i}: pack my box with {i * 5 % 11} dozen liquor jugs.\n" for i in range(40))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    model = save_tiny(root / "tiny-mixtral", "mixtral", scale=5)
    text = root / "text.txt"
    text.write_text(TEXT)
    out, fig = root / "check.json", root / "check.html"
    rc = cli(
        [
            "fisher-check",
            f"model={model}",
            f"text={text}",
            "samples=9",
            "prompts=2",
            "prompt_tokens=10",
            "decode_tokens=3",
            "batch=4",
            f"out={out}",
            f"figure={fig}",
            "progress=false",
        ]
    )
    assert rc == 0
    html = fig.read_text()
    assert (
        "<html>" in html[:100] and "https://cdn" not in html[:2000] and len(html) > 1_000_000
    )  # plotly.js inline
    return model, json.loads(out.read_text())


def test_report_keys(report):
    _, r = report
    for key in (
        "model",
        "text",
        "text_sha256",
        "dtype",
        "seed",
        "samples",
        "loss",
        "fisher",
        "sequences",
        "layers",
        "per_layer",
        "per_pair",
        "pairs",
    ):
        assert key in r, key
    assert r["samples"] == 9 and len(r["pairs"]) == 9 and len(r["layers"]) == 3
    assert [row["pairs"] for row in r["layers"]] == [3, 3, 3]
    for key in ("second_order", "first_order", "both", "second_order_abs"):
        assert set(r["per_pair"][key]) == {"pearson", "spearman"}
    assert set(r["per_layer"]) == {"spearman", "pearson", "layers", "abs", "taylor"}
    for p in r["pairs"]:
        assert p["second_order"] == pytest.approx(0.5 * p["w2"] ** 2 * p["fisher"])
        assert p["first_order"] == pytest.approx(p["w2"] * p["first_order_term"])
        assert np.isfinite(p["measured"])
    row = r["layers"][0]
    assert row["predicted_mean"] == pytest.approx(0.5 * row["mean_w2_sq"] * row["S_l"])


def _nll(model, tokens, targets, edit_at=None) -> float:
    """Summed NLL (nats) of one sequence; `edit_at=(block, t)` replaces that block's output at
    position t by E1(x) (the top expert alone, weight 1), with the expert maths written out."""
    h = None
    if edit_at is not None:
        block, t = edit_at

        def hook(m, args, out):
            x = args[0][0, t]
            _, w, ids = m.gate(x[None])
            e1 = int(ids[0, torch.argmax(w[0])])
            gate, up = (m.experts.gate_up_proj[e1] @ x).chunk(2)
            out = out.clone()
            out[0, t] = m.experts.down_proj[e1] @ (torch.nn.functional.silu(gate) * up)
            return out

        h = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
    finally:
        if h is not None:
            h.remove()
    return float(-torch.log_softmax(logits, -1).gather(-1, targets[..., None]).sum())


def test_measured_change_recomputed_directly(report):
    """Really drop e2 at (pos, layer) in a separate batch-1 float64 forward: the change of the
    summed NLL must equal the reported measurement."""
    model_dir, r = report
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float64, experts_implementation="eager"
    ).eval()
    for pair in r["pairs"][::4]:
        seq = r["sequences"][pair["seq"]]
        tokens, targets = torch.tensor([seq["tokens"]]), torch.tensor([seq["targets"]])
        block = model.model.layers[pair["layer"]].mlp  # tiny Mixtral: MoE layer l = decoder layer l
        direct = _nll(model, tokens, targets, (block, pair["pos"])) - _nll(model, tokens, targets)
        assert pair["measured"] == pytest.approx(direct, rel=1e-4, abs=1e-6), pair
