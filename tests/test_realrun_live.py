"""Live-model realrun on a tiny random Mixtral: logits bit-identical with and without prefetch,
and identical to the plain transformers model under the same gating."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sim.cli import main  # noqa: E402
from sim.tracer.tiny import save_tiny  # noqa: E402

TEXT = ("The simulator replays the routing of a trace with the sizes of a preset. " * 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("live")
    model = save_tiny(root / "tiny-mixtral", "mixtral", scale=4.0, num_hidden_layers=4, num_local_experts=8)
    text = root / "heldout.txt"
    text.write_text(TEXT)
    return model, text


def live(model, text, tmp, *extra):
    from sim.realrun.build import parse_realrun
    from sim.realrun.live import live_run

    cfg, opts = parse_realrun([f"model={model}", f"text={text}", "seqs=2", "seq_len=24", "cache.slots=8",
                               "hw=rtx4090", f"store_dir={tmp}", "progress=false", *extra])
    return live_run(cfg, opts)


def test_topk_is_the_plain_model_with_and_without_prefetch(tiny, tmp_path):
    model, text = tiny
    a = live(model, text, tmp_path / "s", "policy=baseline")
    b = live(model, text, tmp_path / "s", "policy=mixtral_offloading", "store=host")
    assert b.run.summary["prefetch_issued"] > 0  # prefetching really happened
    assert a.run.summary["demand_loads_per_token"] > 0  # experts really came from the store
    for r in (a, b):
        assert torch.equal(r.logits, r.plain_logits)  # the unmodified transformers model
        assert r.metrics["logits_identical_to_reference"] and r.metrics["reference_identical_to_plain"]
        assert r.metrics["dL_est_total"] == 0 and r.metrics["ppl_gated"] == r.metrics["ppl_plain"]
    assert torch.equal(a.logits, b.logits)


def test_adaptive_gating_bit_identical_with_and_without_prefetch(tiny, tmp_path):
    model, text = tiny
    runs = [live(model, text, tmp_path / "s", "policy=adapmoe", "gating.T=0.5", *extra)
            for extra in (["prefetch.name=none"], ["engine.pipelining=true"])]
    a, b = runs
    assert a.run.summary["single_expert_share"] > 0  # experts were really dropped
    assert a.metrics["dL_est_total"] > 0
    assert not a.metrics["reference_identical_to_plain"]  # the gating changed the model's output
    for r in runs:
        assert r.metrics["logits_identical_to_reference"]
        assert r.metrics["max_abs_logit_diff_vs_reference"] == 0
    assert b.run.summary["prefetch_issued"] > 0
    assert torch.equal(a.logits, b.logits)
    assert a.metrics["ppl_gated"] == b.metrics["ppl_gated"]


def test_live_cli_and_bad_inputs(tiny, tmp_path, capsys):
    model, text = tiny
    out = tmp_path / "res"
    rc = main(["realrun", f"model={model}", f"text={text}", "seqs=1", "seq_len=16", "cache.slots=8",
               "hw=rtx4090", f"store_dir={tmp_path / 's'}", f"out={out}", "progress=false"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "ppl_gated" in stdout and (out / "summary.json").is_file()
    rc = main(["realrun", f"model={model}", f"text={text}", "policy=adapmoe_yield", "cache.slots=8",
               "hw=rtx4090", f"out={tmp_path / 'r2'}", "progress=false"])
    _, err = capsys.readouterr()
    assert rc == 2 and "stateless gating" in err and err.count("\n") == 1
    rc = main(["realrun", f"model={model}", f"text={tmp_path / 'missing.txt'}", f"out={tmp_path / 'r3'}"])
    _, err = capsys.readouterr()
    assert rc == 2 and "text file not found" in err
