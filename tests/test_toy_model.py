"""The bundled toy MoE (`sim/toy/`, `models/toy-mixtral/`): tokenizer, checkpoint, training, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sim.toy.corpus import Corpus, is_heldout, load_corpus, write_heldout_text  # noqa: E402
from sim.toy.model import ToyModelConfig  # noqa: E402
from sim.toy.tokenizer import build_tokenizer  # noqa: E402
from sim.toy.train import TrainConfig, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "models" / "toy-mixtral"
SAMPLES = [
    "",
    "hello world",
    "  two  spaces\tand a tab\n",
    "def f(x):\n    return x ** 2  # ok\n",
    "héllo wörld ✓ 日本語 \U0001f600",
    "\x00\x01\x7f control bytes",
    "don't , . ! ?  'quoted'",
]


def tiny_config(**overrides) -> TrainConfig:
    model = ToyModelConfig(layers=2, hidden=16, intermediate=16, heads=2, kv_heads=1, context=32)
    base = dict(
        steps=5,
        batch=2,
        seq_len=32,
        lr=1e-2,
        warmup=0,
        log_every=1,
        eval_every=5,
        eval_windows=2,
        final_eval_windows=2,
        threads=1,
        model=model,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def small_corpus() -> Corpus:
    full = load_corpus()
    return Corpus(
        full.train[:200_000],
        full.heldout[:20_000],
        full.train_docs,
        full.heldout_docs,
        full.python_version,
        full.heldout_percent,
    )


def check_round_trip(tok) -> None:
    for text in SAMPLES:
        ids = tok(text).input_ids
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text


def test_tokenizer_round_trip_after_save_and_autoload(tmp_path):
    build_tokenizer(model_max_length=256).save_pretrained(str(tmp_path))
    check_round_trip(transformers.AutoTokenizer.from_pretrained(str(tmp_path)))
    assert len(build_tokenizer()) == 256


def test_committed_checkpoint_loads_with_auto_classes():
    tok = transformers.AutoTokenizer.from_pretrained(str(CHECKPOINT))
    check_round_trip(tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(CHECKPOINT))
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (
        "mixtral",
        32,
        8,
        2,
    )
    assert cfg.vocab_size == 256
    moe_blocks = [m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
    assert len(moe_blocks) == 32
    assert all(b.experts.gate_up_proj.shape[0] == 8 and b.gate.top_k == 2 for b in moe_blocks)
    ids = torch.tensor([tok("import os\n").input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert out.logits.shape == (1, ids.shape[1], 256)
    assert torch.isfinite(out.logits).all()
    assert len(out.router_logits) == 32 and out.router_logits[0].shape == (ids.shape[1], 8)
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 16 * 2**20
    assert "## Routing statistics" in (CHECKPOINT / "README.md").read_text()


def test_tiny_training_is_deterministic_and_learns(small_corpus):
    a = train(tiny_config(), small_corpus, progress=False)
    b = train(tiny_config(), small_corpus, progress=False)
    losses_a = [r["train_loss"] for r in a.log[1:]]
    assert losses_a == [r["train_loss"] for r in b.log[1:]]
    assert a.final.bits_per_byte == b.final.bits_per_byte
    assert all(math.isfinite(x) for x in losses_a)
    assert losses_a[-1] < losses_a[0]
    assert a.final.usage.shape == (2, 8)
    assert a.final.usage.sum(axis=1) == pytest.approx([1.0, 1.0])
    c = train(tiny_config(seed=1), small_corpus, progress=False)
    assert [r["train_loss"] for r in c.log[1:]] != losses_a


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    from sim.cli import main

    out = tmp_path / "toy"
    argv = [
        "train-toy",
        f"out={out}",
        "steps=2",
        "batch=2",
        "seq_len=32",
        "threads=1",
        "eval_windows=2",
        "final_eval_windows=2",
        "progress=false",
        "model.layers=2",
        "model.hidden=16",
        "model.intermediate=16",
        "model.heads=2",
        "model.kv_heads=1",
        "model.context=32",
    ]
    assert main(argv) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 2
    assert "python -m sim train-toy" in (out / "README.md").read_text()
    assert main(argv) == 2  # refuses to overwrite a non-empty folder


@pytest.mark.parametrize("bad", ["steps=abc", "bogus=1", "lr=-1", "seq_len=4096", "steps"])
def test_cli_bad_argument_exits_2_with_one_line(tmp_path, bad):
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "train-toy", f"out={tmp_path / 'x'}", bad],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert not (tmp_path / "x").exists()


def test_heldout_split_and_text(tmp_path, small_corpus):
    assert is_heldout("json/decoder.py") == is_heldout("json/decoder.py")
    assert not set(small_corpus.train_docs) & set(small_corpus.heldout_docs)
    n = write_heldout_text(tmp_path / "heldout.txt", max_bytes=5000, corpus=small_corpus)
    text = (tmp_path / "heldout.txt").read_bytes()
    assert len(text) == n <= 5000 and text.endswith(b"\n") and small_corpus.heldout.startswith(text)
