"""A table of bad inputs across every command (issue 13): one line, the right exit, nothing written.

Every case runs `python -m sim ...` (in this process through `sim.cli.main`, with the working
folder a fresh empty one; in a subprocess where a real process is needed: a closed pipe, a full
disk) and is checked for

- its exit status: 2 for the user's input, 1 for the machine failing (a full disk);
- exactly one line on stderr, `error: ...`, holding the expected words; no traceback;
- nothing written: the working folder and the inputs' folder are as they were (no output, no
  temporary folder, no lock file), and for the cases that claim an output late, no stdout either.

The slow tests at the end SIGKILL `run`, `import`, `trace` and `sweep` while they write, then rerun
them: the rerun succeeds and no litter is left; and a sweep whose parent alone is killed leaves no
worker process behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from sim import REPO_ROOT
from sim.cli import main
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace

JETSON = (REPO_ROOT / "hwprofiles" / "jetson.yaml").read_text()
NOT_UTF8 = b"name: \xff\xfe\xfa bad bytes\n"


# ------------------------------------------------------------------------------------ inputs


def _trace_copy(src: Path, dst: Path, **model_edits) -> Path:
    shutil.copytree(src, dst)
    meta = yaml.safe_load((dst / "meta.yaml").read_text())
    for key, value in model_edits.items():
        section, _, name = key.partition("__")
        meta[section][name] = value
    (dst / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return dst


def _profile(path: Path, dotted: str, value: object) -> Path:
    """The bundled Jetson profile with the number at `dotted` (a `{value, source}` entry) replaced."""
    data = yaml.safe_load(JETSON)
    node = data
    for key in dotted.split("."):
        node = node[key]
    node["value"] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Every bad (and a few good) inputs the table refers to, by name: `{name}` in a case's argv."""
    d = tmp_path_factory.mktemp("fuzz-inputs")
    p: dict[str, Path] = {}
    p["trace"] = d / "trace"
    write_trace(random_trace(np.random.default_rng(0), tokens=12, prefill=4, layers=32, locality=0.4,
                             name="mixtral-8x7b"), p["trace"])
    t = p["trace"]
    p["tr_layers_frac"] = _trace_copy(t, d / "tr_layers_frac", model__layers=32.7)
    p["tr_layers_huge"] = _trace_copy(t, d / "tr_layers_huge", model__layers=10**9)
    p["tr_topk_str"] = _trace_copy(t, d / "tr_topk_str", model__top_k="2")
    p["tr_renorm"] = _trace_copy(t, d / "tr_renorm", model__renormalize="yes please")
    p["tr_no_topk"] = d / "tr_no_topk"
    shutil.copytree(t, p["tr_no_topk"])
    meta = yaml.safe_load((t / "meta.yaml").read_text())
    del meta["model"]["top_k"]
    (p["tr_no_topk"] / "meta.yaml").write_text(yaml.safe_dump(meta))
    p["tr_sl_oops"] = d / "tr_sl_oops"
    shutil.copytree(t, p["tr_sl_oops"])
    meta = yaml.safe_load((t / "meta.yaml").read_text())
    meta["sensitivity"]["S_l"] = "oops"
    (p["tr_sl_oops"] / "meta.yaml").write_text(yaml.safe_dump(meta))
    p["tr_sl_nan"] = d / "tr_sl_nan"
    shutil.copytree(t, p["tr_sl_nan"])
    meta["sensitivity"]["S_l"] = [float("nan")] * 32
    (p["tr_sl_nan"] / "meta.yaml").write_text(yaml.safe_dump(meta))
    p["tr_utf8"] = d / "tr_utf8"
    shutil.copytree(t, p["tr_utf8"])
    (p["tr_utf8"] / "meta.yaml").write_bytes(NOT_UTF8)
    p["tr_corrupt"] = d / "tr_corrupt"
    shutil.copytree(t, p["tr_corrupt"])
    (p["tr_corrupt"] / "routing.parquet").write_bytes(b"\x00garbage\xff" * 40)
    p["tr_nometa"] = d / "tr_nometa"
    p["tr_nometa"].mkdir()

    link = "links.storage_to_device"
    p["hw_slow"] = _profile(d / "hw_slow.yaml", f"{link}.bandwidth_Bps", 1e-300)
    p["hw_channels"] = _profile(d / "hw_channels.yaml", f"{link}.channels", 1_000_000_000)
    p["hw_latency"] = _profile(d / "hw_latency.yaml", f"{link}.latency_s", 1e308)
    p["hw_nan"] = _profile(d / "hw_nan.yaml", "device.matmul_flops", float("nan"))
    p["hw_utf8"] = d / "hw_utf8.yaml"
    p["hw_utf8"].write_bytes(NOT_UTF8)

    p["cfg_utf8"] = d / "cfg_utf8.yaml"
    p["cfg_utf8"].write_bytes(NOT_UTF8)
    p["cfg_list"] = d / "cfg_list.yaml"
    p["cfg_list"].write_text("- a\n- b\n")
    p["cfg_yaml"] = d / "cfg_yaml.yaml"
    p["cfg_yaml"].write_text("cache: [unclosed\n")
    p["cfg_bits"] = d / "cfg_bits.yaml"
    p["cfg_bits"].write_text("quant:\n  bits: 0\n")
    p["sens_utf8"] = d / "sens_utf8.txt"
    p["sens_utf8"].write_bytes(NOT_UTF8)
    p["sens_oops"] = d / "sens_oops.yaml"
    p["sens_oops"].write_text("S_l: [oops, 1, 2]\n")

    rec = {"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5]}
    p["log_bigid"] = d / "bigid.jsonl"
    p["log_bigid"].write_text(json.dumps({**rec, "experts": [1e20, 2]}) + "\n")
    p["log_bigpos"] = d / "bigpos.jsonl"
    p["log_bigpos"].write_text(json.dumps({**rec, "token_idx": 1e30}) + "\n")
    p["log_nanw"] = d / "nanw.jsonl"
    p["log_nanw"].write_text(json.dumps(rec).replace("0.5, 0.5", "NaN, 0.5") + "\n")
    p["log_ok"] = d / "ok.jsonl"
    p["log_ok"].write_text("".join(json.dumps({**rec, "layer": layer}) + "\n" for layer in range(32)))
    p["log_utf8"] = d / "utf8.jsonl"
    p["log_utf8"].write_bytes(b'{"layer": 0}\n\xff\xfe\n')
    p["npz_text"] = d / "text.npz"
    p["npz_text"].write_text("this is not a zip\n")
    p["npz_trunc"] = d / "trunc.npz"
    buf = d / "full.npz"
    np.savez(buf, experts=np.zeros((4, 32, 2), dtype=np.int64), weights=np.ones((4, 32, 2)))
    p["npz_trunc"].write_bytes(buf.read_bytes()[:200])
    buf.unlink()
    p["npz_obj"] = d / "obj.npz"
    with zipfile.ZipFile(p["npz_obj"], "w") as z:
        z.writestr("experts.npy", b"\x93NUMPY garbage")

    # results folders for `report`
    run = d / "run"
    assert main(["run", f"trace={t}", f"out={run}", "report=false"]) == 0
    for name, breakit in (("run_layers", "layers.parquet"), ("run_events", "events.parquet"),
                          ("run_tokens", "tokens.parquet")):
        p[name] = d / name
        shutil.copytree(run, p[name])
        (p[name] / breakit).write_bytes(b"PAR1 not really" * 10)
    p["run_list"] = d / "run_list"
    shutil.copytree(run, p["run_list"])
    (p["run_list"] / "summary.json").write_text("[1, 2, 3]\n")
    p["run_utf8"] = d / "run_utf8"
    shutil.copytree(run, p["run_utf8"])
    (p["run_utf8"] / "summary.json").write_bytes(b'{"a": "\xff"}')
    p["run_nested"] = d / "run_nested"
    shutil.copytree(run, p["run_nested"])
    (p["run_nested"] / "summary.json").write_text('{"tpot_mean_s": {"a": 1}}')
    p["run_nokind"] = d / "run_nokind"
    shutil.copytree(run, p["run_nokind"])
    pl.read_parquet(run / "events.parquet").drop("kind").write_parquet(p["run_nokind"] / "events.parquet")
    p["sweep_bad"] = d / "sweep_bad"
    p["sweep_bad"].mkdir()
    (p["sweep_bad"] / "sweep.parquet").write_bytes(b"\x00" * 64)
    p["sweep_types"] = d / "sweep_types"
    p["sweep_types"].mkdir()
    pl.DataFrame({"point": ["a"], "error": [None], "policy": ["baseline"], "tpot_mean_s": ["fast"]}).write_parquet(
        p["sweep_types"] / "sweep.parquet")
    p["neither"] = d / "neither"
    p["neither"].mkdir()
    p["afile"] = d / "afile.txt"
    p["afile"].write_text("a file\n")
    p["adir"] = d / "adir"
    p["adir"].mkdir()
    p["loop"] = d / "loop"
    os.symlink(d / "loop2", p["loop"])
    os.symlink(p["loop"], d / "loop2")
    p["full"] = d / "full"  # an existing non-empty folder
    p["full"].mkdir()
    (p["full"] / "keep.txt").write_text("mine\n")
    p["run_ok"] = run
    out = {k: str(v) for k, v in p.items()}
    out["root"] = str(d)
    out["long"] = "n" * 300
    return out


# ------------------------------------------------------------------------------------ the table

T = "trace={trace}"
OUT = "out={W}/o"  # every command's output goes into the case's own (empty) working folder

CASES: list[tuple[str, list[str], int, str]] = [
    # --- no silent substitution: a path is that path, only a bare name is looked up
    ("hw-missing-path", ["run", "hw=/some/missing/jetson.yaml", T, OUT], 2,
     "hardware profile file not found: /some/missing/jetson.yaml"),
    ("hw-missing-rel-path", ["run", "hw=some/missing/jetson.yaml", T, OUT], 2, "file not found: some/missing"),
    ("hw-missing-name", ["run", "hw=nope", T, OUT], 2, "hardware profile 'nope' not found"),
    ("hw-folder", ["run", "hw={adir}", T, OUT], 2, "is a folder, not a file"),
    ("trace-missing-path", ["run", "trace=/some/missing/toy", OUT], 2, "trace folder not found: /some/missing/toy"),
    ("trace-missing-name", ["run", "trace=nope", OUT], 2, "trace 'nope' not found"),
    ("trace-file", ["run", "trace={afile}", OUT], 2, "is a file, not a folder"),
    ("config-missing", ["run", "config={W}/nope.yaml", T, OUT], 2, "config file not found"),
    ("config-folder", ["run", "config={adir}", T, OUT], 2, "is a folder, not a file"),
    ("bench-hw-missing", ["bench", "hw=/missing/dir/jetson.yaml", T], 2, "file not found: /missing/dir"),
    ("paper-hw-missing", ["paper", "hw=/missing/x.yaml", T], 2, "file not found: /missing/x.yaml"),
    ("model-path", ["run", "model=/some/dir/model", T, OUT], 2, "model file or folder not found: /some/dir/model"),
    ("realrun-live-model-missing", ["realrun", "live=true", "model=/some/dir/ckpt", T, OUT], 2,
     "model folder not found: /some/dir/ckpt"),
    ("trace-cmd-model-missing", ["trace", "model=/nope/ckpt", "text={afile}", OUT], 2, "model folder not found"),
    # --- numbers: the valid range in the message
    ("quant-bits-0", ["run", T, "quant.bits=0", OUT], 2, "'quant.bits': 0 (must be a number > 0"),
    ("quant-bits-neg", ["run", T, "quant.bits=-2", OUT], 2, "'quant.bits': -2"),
    ("quant-bits-nan", ["run", T, "quant.bits=nan", OUT], 2, "must be finite"),
    ("quant-bits-inf", ["run", T, "quant.bits=1e400", OUT], 2, "must be finite"),
    ("quant-group-neg", ["run", T, "quant.group_size=-64", OUT], 2, "'quant.group_size': -64 (must be an integer >= 0"),
    ("quant-group-frac", ["run", T, "quant.group_size=2.5", OUT], 2, "'quant.group_size'"),
    ("max-tokens-neg", ["run", T, "engine.max_tokens=-5", OUT], 2, "'engine.max_tokens': -5"),
    ("staging-0", ["run", T, "engine.staging_buffers=0", OUT], 2, "'engine.staging_buffers': 0 (must be an integer >= 1"),
    ("seed-neg", ["run", T, "seed=-1", OUT], 2, "'seed': -1 (must be an integer >= 0"),
    ("seed-float", ["run", T, "seed=1e30", OUT], 2, "'seed'"),
    ("slots-frac", ["run", T, "cache.slots=2.5", OUT], 2, "'cache.slots': 2.5 (must be a whole number"),
    ("slots-text", ["run", T, "cache.slots=abc", OUT], 2, "'cache.slots': 'abc'"),
    ("slots-bool", ["run", T, "cache.slots=true", OUT], 2, "'cache.slots': True"),
    ("slots-1", ["run", T, "cache.slots=1", OUT], 2, "one layer needs 2"),
    ("bytes-neg", ["run", T, "cache.bytes=-1", OUT], 2, "'cache.bytes': -1 (must be a number > 0"),
    ("bytes-nan", ["run", T, "cache.bytes=nan", OUT], 2, "'cache.bytes': 'nan' (str) (must be a number > 0)"),
    ("slots-and-bytes", ["run", T, "cache.slots=8", "cache.bytes=1e9", OUT], 2, "not both"),
    ("gating-T-nan", ["run", T, "gating.name=adapmoe", "gating.T=nan", OUT], 2, "'gating.T': nan (must be finite"),
    ("gating-T-neg", ["run", T, "gating.name=adapmoe", "gating.T=-1", OUT], 2, "'gating.T': -1"),
    ("gating-p", ["run", T, "gating.name=top_p", "gating.p=1.5", OUT], 2, "'gating.p': 1.5 (must be a number > 0 and <= 1"),
    ("gating-min-experts", ["run", T, "gating.name=adapmoe", "gating.min_experts=0", OUT], 2, "gating.min_experts"),
    ("placement-rel-error", ["run", T, "placement.name=low_precision_on_miss", "placement.rel_error=-3", OUT], 2,
     "'placement.rel_error': -3 (must be a number >= -1"),
    ("prefetch-count-nan", ["run", T, "prefetch.count=nan", OUT], 2, "prefetch.count"),
    ("lru-sizes-neg", ["run", T, "cache.name=lru", "cache.sizes=[-1,2]", OUT], 2, "cache.sizes[0]"),
    ("hw-bandwidth-floor", ["run", T, "hw={hw_slow}", OUT], 2, "bandwidth_Bps: value must be a number >= 1000 B/s"),
    ("hw-channels", ["run", T, "hw={hw_channels}", OUT], 2, "channels: value must be an integer >= 1 and <= 1024"),
    ("hw-latency", ["run", T, "hw={hw_latency}", OUT], 2, "latency_s: value must be a number >= 0 and <= 3600"),
    ("hw-nan", ["run", T, "hw={hw_nan}", OUT], 2, "matmul_flops: value must be finite"),
    ("meta-layers-frac", ["run", "trace={tr_layers_frac}", OUT], 2, "'model.layers': 32.7 (must be a whole number"),
    ("meta-layers-huge", ["run", "trace={tr_layers_huge}", OUT], 2, "'model.layers': 1000000000"),
    ("meta-topk-str", ["run", "trace={tr_topk_str}", OUT], 2, "'model.top_k': '2' (str)"),
    ("meta-topk-missing", ["run", "trace={tr_no_topk}", OUT], 2, "model.top_k is missing"),
    ("meta-renormalize", ["run", "trace={tr_renorm}", OUT], 2, "'model.renormalize': 'yes please' (must be true or false)"),
    ("meta-sl-oops", ["run", "trace={tr_sl_oops}", OUT], 2, "sensitivity.S_l must be a list of 32 numbers"),
    ("meta-sl-nan", ["run", "trace={tr_sl_nan}", OUT], 2, "'sensitivity.S_l[0]': nan"),
    ("paper-T-nan", ["paper", T, "T=nan"], 2, "'T': nan (must be finite"),
    ("paper-slots-0", ["paper", T, "slots=0"], 2, "'slots': 0 (must be an integer >= 1"),
    ("paper-slots-1", ["paper", T, "slots=1"], 2, "one layer needs 2"),
    ("paper-factor", ["paper", T, "T_miss_factor=-1"], 2, "'T_miss_factor': -1"),
    ("paper-fit", ["paper", T, "fit=magic"], 2, "fit must be one of trace, published"),
    ("paper-sensitivity", ["paper", T, "sensitivity=/no/such/file"], 2, "sensitivity must be published, trace or a file"),
    ("paper-trace-corrupt", ["paper", "trace={tr_corrupt}"], 2, "corrupt or not Parquet"),
    ("bench-tokens-neg", ["bench", T, "tokens=-5"], 2, "'tokens': -5 (must be an integer >= 0"),
    ("bench-repeats-0", ["bench", T, "repeats=0"], 2, "'repeats': 0 (must be an integer >= 1"),
    ("confirm-repeats-neg", ["confirm", "repeats=-1", OUT], 2, "'repeats': -1 (must be an integer >= 1"),
    ("confirm-tokens-neg", ["confirm", "tokens=-1", OUT], 2, "'tokens': -1 (must be an integer >= 1"),
    ("confirm-slots-0", ["confirm", "slots=0", OUT], 2, "'slots': 0"),
    ("calibrate-repeats-0", ["calibrate", "repeats=0", "out={W}/p.yaml"], 2, "'repeats': 0"),
    ("realrun-channels", ["realrun", T, "channels=2000", OUT], 2, "'channels': 2000 (must be an integer >= 1 and <= 1024"),
    ("realrun-threads-0", ["realrun", T, "threads=0", OUT], 2, "'threads': 0"),
    ("realrun-seed-neg", ["realrun", T, "seed=-1", OUT], 2, "'seed': -1"),
    ("trace-prompts-0", ["trace", "model={adir}", "text={afile}", "prompts=0", OUT], 2, "'prompts': 0"),
    ("fisher-samples-0", ["fisher-check", "model={adir}", "text={afile}", "samples=0"], 2, "'samples': 0"),
    ("stats-T-nan", ["stats", T, "T=nan"], 2, "'T[0]': nan (must be finite"),
    ("stats-T-neg", ["stats", T, "T=0.005,-1"], 2, "'T[1]': -1"),
    ("sweep-seed-neg", ["sweep", T, "seed=-1", OUT], 2, "'seed': -1"),
    ("sweep-jobs-neg", ["sweep", T, "jobs=-1", OUT], 2, "'jobs': -1"),
    ("sweep-T-nan", ["sweep", T, "policy=adapmoe", "gating.T=0.01,nan", OUT], 2, "gating.T=nan: bad value for 'gating.T'"),
    # --- decode errors, overflow, bad archives: one line naming the file
    ("config-not-utf8", ["run", "config={cfg_utf8}", T, OUT], 2, "config file"),
    ("config-list", ["run", "config={cfg_list}", T, OUT], 2, "must hold a mapping"),
    ("config-bad-yaml", ["run", "config={cfg_yaml}", T, OUT], 2, "is not valid YAML"),
    ("config-bits-0", ["run", "config={cfg_bits}", T, OUT], 2, "'quant.bits': 0"),
    ("meta-not-utf8", ["run", "trace={tr_utf8}", OUT], 2, "is not UTF-8 text"),
    ("meta-missing", ["run", "trace={tr_nometa}", OUT], 2, "meta.yaml is missing"),
    ("routing-corrupt", ["run", "trace={tr_corrupt}", OUT], 2, "corrupt or not Parquet"),
    ("hw-not-utf8", ["run", T, "hw={hw_utf8}", OUT], 2, "not UTF-8 text"),
    ("stats-sens-utf8", ["stats", T, "sensitivity={sens_utf8}"], 2, "sens_utf8.txt is not UTF-8 text"),
    ("stats-sens-oops", ["stats", T, "sensitivity={sens_oops}"], 2, "expected 32 numbers"),
    ("gating-sens-oops", ["run", T, "gating.name=adapmoe", "gating.sensitivity={sens_oops}", OUT], 2,
     "sensitivities must be 32 numbers"),
    ("gating-sens-utf8", ["run", T, "gating.name=adapmoe", "gating.sensitivity={sens_utf8}", OUT], 2, "not UTF-8"),
    ("import-id-1e20", ["import", "{log_bigid}", "model=mixtral-8x7b", OUT], 2, "out of range"),
    ("import-pos-1e30", ["import", "{log_bigpos}", "model=mixtral-8x7b", OUT], 2, "out of range"),
    ("import-nan-weight", ["import", "{log_nanw}", "model=mixtral-8x7b", OUT], 2, "is not finite"),
    ("import-not-utf8", ["import", "{log_utf8}", "model=mixtral-8x7b", OUT], 2, "not UTF-8"),
    ("import-npz-text", ["import", "{npz_text}", "model=mixtral-8x7b", OUT], 2, "not an .npz file"),
    ("import-npz-on-jsonl", ["import", "{log_ok}", "format=npz", "model=mixtral-8x7b", OUT], 2,
     "is not an .npz file (not a zip archive of arrays); is format= right?"),
    ("import-npz-truncated", ["import", "{npz_trunc}", "model=mixtral-8x7b", OUT], 2, ".npz"),
    ("import-npz-garbage", ["import", "{npz_obj}", "model=mixtral-8x7b", OUT], 2, "not a readable .npz file"),
    ("import-model", ["import", "{log_ok}", "model=nope", OUT], 2, "unknown model preset 'nope'"),
    ("import-format", ["import", "{log_ok}", "format=xml", "model=mixtral-8x7b", OUT], 2, "unknown format 'xml'"),
    ("import-missing", ["import", "{W}/none.jsonl", "model=mixtral-8x7b", OUT], 2, "import file not found"),
    ("report-layers", ["report", "{run_layers}", "out={W}/r.html"], 2, "layers.parquet is corrupt or not Parquet"),
    ("report-events", ["report", "{run_events}", "out={W}/r.html"], 2, "events.parquet is corrupt or not Parquet"),
    ("report-tokens", ["report", "{run_tokens}", "out={W}/r.html"], 2, "tokens.parquet is corrupt or not Parquet"),
    ("report-sweep", ["report", "{sweep_bad}", "out={W}/r.html"], 2, "sweep.parquet is corrupt or not Parquet"),
    ("report-sweep-types", ["report", "{sweep_types}", "out={W}/r.html"], 2, "'tpot_mean_s' must hold numbers"),
    ("report-summary-list", ["report", "{run_list}", "out={W}/r.html"], 2, "must hold mappings"),
    ("report-summary-utf8", ["report", "{run_utf8}", "out={W}/r.html"], 2, "not UTF-8"),
    ("report-summary-nested", ["report", "{run_nested}", "out={W}/r.html"], 2, "'tpot_mean_s' must be a number"),
    ("report-events-columns", ["report", "{run_nokind}", "out={W}/r.html"], 2, "column 'kind' is missing"),
    ("report-neither", ["report", "{neither}", "out={W}/r.html"], 2, "neither a sweep folder"),
    ("report-missing", ["report", "{W}/nope"], 2, "folder not found"),
    ("report-none", ["report"], 2, "give one or more sweep or run folders"),
    # --- output paths: checked (and claimed) before the work
    ("out-too-long", ["run", T, "out={W}/{long}"], 2, "is 300 bytes long (at most 255)"),
    ("out-symlink-loop", ["run", T, "out={loop}/x"], 2, "Too many levels of symbolic links"),
    ("out-under-file", ["run", T, "out={afile}/x"], 2, "is a file, not a folder"),
    ("out-proc", ["run", T, "out=/proc/simout"], 2, "not on a file system that can hold files"),
    ("out-exists", ["run", T, "out={full}"], 2, "already exists and is not empty"),
    ("out-is-file", ["run", T, "out={afile}"], 2, "exists and is not a folder"),
    ("out-locked", ["run", T, "out={W}/locked"], 2, "is being written by another command"),
    ("import-out-too-long", ["import", "{log_ok}", "model=mixtral-8x7b", "out={W}/{long}"], 2, "at most 255"),
    ("import-out-exists", ["import", "{log_ok}", "model=mixtral-8x7b", "out={full}"], 2, "already exists"),
    ("import-out-loop", ["import", "{log_ok}", "model=mixtral-8x7b", "out={loop}/t"], 2, "symbolic links"),
    ("stats-json-proc", ["stats", T, "json=/proc/stats.json"], 2, "not on a file system that can hold files"),
    ("stats-json-folder", ["stats", T, "json={adir}"], 2, "is a folder; give a file name"),
    ("stats-json-nofolder", ["stats", T, "json={W}/no/such/x.json"], 2, "does not exist"),
    ("paper-out-folder", ["paper", T, "out={adir}"], 2, "is a folder; give a file name"),
    ("paper-out-proc", ["paper", T, "out=/proc/paper.md"], 2, "not on a file system"),
    ("paper-out-long", ["paper", T, "out={W}/{long}.md"], 2, "at most 255"),
    ("calibrate-out-folder", ["calibrate", "out={adir}"], 2, "is a folder; give a file name"),
    ("calibrate-out-proc", ["calibrate", "out=/proc/local.yaml"], 2, "not on a file system"),
    ("report-out-folder", ["report", "{run_ok}", "out={adir}"], 2, "is a folder; give a file name"),
    ("report-out-long", ["report", "{run_ok}", "out={W}/{long}.html"], 2, "at most 255"),
    ("fisher-out-folder", ["fisher-check", "model={adir}", "text={afile}", "out={adir}"], 2, "not a file path"),
    ("sweep-out-long", ["sweep", T, "out={W}/{long}"], 2, "at most 255"),
    ("sweep-out-loop", ["sweep", T, "out={loop}/s"], 2, "symbolic links"),
    ("sweep-out-file", ["sweep", T, "out={afile}"], 2, "exists and is not a folder"),
    ("realrun-out-exists", ["realrun", T, "out={full}"], 2, "already exists"),
    ("confirm-out-long", ["confirm", "out={W}/{long}"], 2, "at most 255"),
    ("trace-out-exists", ["trace", "model={adir}", "text={afile}", "out={full}"], 2, "already exists"),
    ("train-toy-out-exists", ["train-toy", "out={full}", "steps=1"], 2, "already exists"),
    # --- a sweep refuses before its first point what no point can use
    ("sweep-baseline", ["sweep", T, "policy=baseline,adapmoe", "baseline=nope", OUT], 2,
     "baseline=nope is not a policy of this sweep"),
    ("sweep-slots-abc", ["sweep", T, "cache.slots=a:b:c", OUT], 2, "'cache.slots': 'a:b:c'"),
    ("sweep-slots-1", ["sweep", T, "cache.slots=1,64", OUT], 2, "cache.slots=1: the expert cache holds 1"),
    ("sweep-trace-corrupt", ["sweep", "trace={tr_corrupt}", "cache.slots=32,64", OUT], 2, "corrupt or not Parquet"),
    ("sweep-hw-missing", ["sweep", T, "hw=jetson,/missing/x.yaml", OUT], 2, "file not found: /missing/x.yaml"),
    ("sweep-ray-address", ["sweep", T, "executor=ray", "ray.address=::::", OUT], 2, "expected auto or HOST:PORT"),
    # --- the command line itself
    ("unknown-command", ["simulate"], 2, "unknown command 'simulate'"),
    ("list-args", ["list", "x=1"], 2, "unknown key 'x'; valid keys: plugins"),
    ("list-part", ["list", "nope"], 2, "list takes one of policies, presets"),
    ("prefetch-accuracy-text", ["run", T, "prefetch.accuracy=abc", OUT], 2, "prefetch.accuracy must be auto, published or a number"),
    ("prefetch-accuracy-nan", ["run", T, "prefetch.accuracy=nan", OUT], 2, "a number in [0, 1], got 'nan'"),
    ("slots-huge", ["run", T, "cache.slots=99999999999999999999", OUT], 2, "must be below 2**63"),
    ("not-key-value", ["run", "hw"], 2, "is not of the form key=value"),
    ("unknown-key", ["run", "cache_slots=8", OUT], 2, "unknown key 'cache_slots'"),
    ("unknown-policy", ["run", T, "policy=nope", OUT], 2, "unknown policy preset 'nope'"),
]


@pytest.mark.parametrize(("argv", "rc", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, rc, words, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    work.mkdir()
    names = {**inputs, "W": str(work)}
    args = [a.format(**names) for a in argv]
    words = words.format(**names)
    monkeypatch.chdir(work)
    held = None
    if any(a.endswith("/locked") for a in args):  # another command is writing that output
        held = os.open(work / ".locked.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(held, fcntl.LOCK_EX)
    before_work, before_inputs = _snapshot(work), _snapshot(Path(inputs["root"]))
    try:
        code = main(args)
    finally:
        if held is not None:
            os.close(held)
            (work / ".locked.lock").unlink()
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == rc, err
    assert words in lines[0], lines[0]
    if held is None:
        assert _snapshot(work) == before_work, "something was written (or left behind)"
    else:
        assert _snapshot(work) == before_work - {".locked.lock"}
    assert _snapshot(Path(inputs["root"])) == before_inputs, "litter beside the inputs"
    assert out == "" or args[0] in ("bench",), f"printed before refusing: {out[:200]!r}"


def _snapshot(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 80
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] for c in CASES}
    assert {"run", "sweep", "import", "report", "stats", "paper", "bench", "confirm", "calibrate", "realrun",
            "trace", "fisher-check", "train-toy"} <= commands


def test_a_string_key_takes_its_value_as_typed():
    from sim.args import parse_args
    from sim.commands.sweep import SweepOptions

    assert parse_args(SweepOptions, ["ray.address=::::"]).ray.address == "::::"


def test_bare_names_still_find_the_bundled_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # away from the repository: bare names and the bundled spelling work
    for hw in ("jetson", "jetson.yaml", "hwprofiles/jetson.yaml"):
        out = tmp_path / f"o-{hw.replace('/', '_')}"
        assert main(["run", f"hw={hw}", "trace=toy", "engine.max_tokens=2", "engine.prefill=false",
                     f"out={out}", "report=false"]) == 0, capsys.readouterr().err
        assert yaml.safe_load((out / "config.yaml").read_text())["resolved"]["hw_file"] == "hwprofiles/jetson.yaml"
    capsys.readouterr()


# ------------------------------------------------------------------------ in real processes


def _sim(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=kw.pop("cwd", REPO_ROOT), capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), **kw)


def _small_files():
    """Writes beyond 200 kB fail with EFBIG, as writes to a full disk fail with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def _one_machine_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: the machine failed"), proc.stderr
    return lines[0]


def test_closed_stdout_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m sim list | head -c 10 > /dev/null; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    assert proc.returncode in (0, 141)  # 141 when the pipe closed before list had printed everything


def test_full_disk_in_run_is_the_machine_and_leaves_nothing(inputs, tmp_path):
    proc = _sim(["run", f"trace={inputs['trace']}", f"out={tmp_path / 'deep' / 'o'}"], preexec_fn=_small_files)
    assert "writing output folder" in _one_machine_line(proc) and str(tmp_path / "deep" / "o") in proc.stderr
    assert list(tmp_path.iterdir()) == []  # not even the parent folder it made


def test_full_disk_in_import_report_and_sweep(inputs, tmp_path):
    big = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    with big.open("w") as fh:  # 2,000 tokens x 32 layers of random routing: a trace over 200 kB
        for t in range(2000):
            for layer in range(32):
                e = rng.choice(8, 2, replace=False).tolist()
                w = float(rng.random())
                fh.write(json.dumps({"seq": 0, "pos": t, "layer": layer, "experts": e, "weights": [w, 1 - w]}) + "\n")
    before = set(tmp_path.iterdir())
    proc = _sim(["import", str(big), "model=mixtral-8x7b", f"out={tmp_path / 'tr'}"], preexec_fn=_small_files)
    _one_machine_line(proc)
    assert set(tmp_path.iterdir()) == before
    proc = _sim(["report", inputs["run_ok"], f"out={tmp_path / 'r.html'}"], preexec_fn=_small_files)
    assert "r.html" in _one_machine_line(proc)
    assert set(tmp_path.iterdir()) == before
    proc = _sim(["sweep", f"trace={inputs['trace']}", "cache.slots=32", f"out={tmp_path / 'sw'}", "progress=false"],
                preexec_fn=_small_files)
    assert "report.html" in _one_machine_line(proc)
    assert not list((tmp_path / "sw").glob(".*.tmp")) and not (tmp_path / "sw" / "report.html").exists()


def test_two_runs_to_one_folder_the_second_fails_at_once(tmp_path):
    out = tmp_path / "o"
    first = subprocess.Popen([sys.executable, "-m", "sim", "run", f"out={out}", "report=false"], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: list(tmp_path.glob(".o.tmp-*")), first)  # the first has claimed `out`
        first.send_signal(signal.SIGSTOP)  # held mid-run while the second tries
        second = _sim(["run", f"out={out}", "report=false"])
        lines = second.stderr.splitlines()
        assert second.returncode == 2 and len(lines) == 1 and "is being written by another command" in lines[0]
    finally:
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    third = _sim(["run", f"out={out}", "report=false"])
    assert third.returncode == 2 and "already exists and is not empty" in third.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _wait_for(cond, proc: subprocess.Popen | None = None, timeout_s: float = 120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended first (status {proc.returncode})")
        time.sleep(0.01)
    raise AssertionError("timed out waiting")


# ------------------------------------------------------------------------------ kill tests (slow)


def _litter(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _kill_mid_write(cmd: list[str], folder: Path, name: str, *, when: str = "tmp") -> None:
    """Start `cmd`, SIGKILL its process group once its temporary output folder exists (and holds a
    file when `when == "file"`), and check that it left litter (so that the rerun has work to do)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def ready():
            tmps = list(folder.glob(f".{name}.tmp-*"))
            return tmps if when == "tmp" else [t for t in tmps if any(t.iterdir())]
        _wait_for(ready, proc, timeout_s=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (folder / name).exists()
    assert _litter(folder, name), "the kill left nothing to clean up: it came too late"


@pytest.mark.slow
def test_kill_run_mid_write_then_rerun(tmp_path):
    cmd = [sys.executable, "-m", "sim", "run", f"out={tmp_path / 'o'}"]  # the bundled trace: writing takes a while
    _kill_mid_write(cmd, tmp_path, "o", when="file")
    other = _sim(["run", f"out={tmp_path / 'other'}", "report=false", "engine.max_tokens=4"])
    assert other.returncode == 0, other.stderr
    assert _litter(tmp_path, "o") == [], "a write beside it removes a dead writer's leftovers"
    _kill_mid_write(cmd, tmp_path, "o")
    again = _sim(["run", f"out={tmp_path / 'o'}", "report=false"])
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "other"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["tokens_decode"] == 2048


@pytest.mark.slow
def test_kill_import_mid_write_then_rerun(tmp_path):
    log = tmp_path / "log.jsonl"
    with log.open("w") as fh:
        for t in range(3000):
            for layer in range(32):
                fh.write(json.dumps({"seq": t // 100, "pos": t % 100, "layer": layer,
                                     "experts": [t % 8, (t + 3) % 8], "weights": [0.7, 0.3]}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "sim", "import", str(log), "model=mixtral-8x7b", f"out={out / 't'}"]
    _kill_mid_write(cmd, out, "t")
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["t"]


@pytest.mark.slow
def test_kill_trace_mid_write_then_rerun(tmp_path):
    pytest.importorskip("torch")
    model = REPO_ROOT / "models" / "toy-mixtral"
    if not (model / "model.safetensors").is_file():
        pytest.skip("the toy model is not built")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "sim", "trace", f"model={model}", f"text={text}", f"out={out / 't'}", "prompts=2",
           "prompt_tokens=16", "decode_tokens=4", "progress=false"]
    _kill_mid_write(cmd, out, "t")
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["t"]


def _workers_of(pid: int) -> list[int]:
    """The spawned pool workers whose parent is `pid` (Linux /proc)."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _sweep(out: Path) -> list[str]:
    return [sys.executable, "-m", "sim", "sweep", "hw=jetson,rtx4090", "policy=baseline,mixtral_offloading",
            "cache.slots=16:160:16", f"out={out}", "jobs=2", "progress=false", "report=false"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_sweep_parent_leaves_no_worker(tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.Popen(_sweep(out), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = _wait_for(lambda: len(_workers_of(proc.pid)) == 2 and _workers_of(proc.pid), proc)
        _wait_for(lambda: (out / "points").is_dir() and list((out / "points").glob("*.json")), proc)
    finally:
        proc.kill()  # the parent alone
        proc.wait(timeout=60)
    _wait_for(lambda: not any(_alive(w) for w in workers), timeout_s=60)
    again = subprocess.run(_sweep(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".*.tmp-*"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_sweep_worker_is_one_line(tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.Popen(_sweep(out), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = _wait_for(lambda: len(_workers_of(proc.pid)) == 2 and _workers_of(proc.pid), proc)
    _wait_for(lambda: (out / "points").is_dir() and list((out / "points").glob("*.json")), proc)
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"a sweep worker died (pid {workers[0]} killed by SIGKILL)" in lines[0], stderr
    assert "failed" in stdout
    again = subprocess.run(_sweep(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_kill_sweep_mid_write_then_rerun(tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.Popen(_sweep(out), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: (out / "points").is_dir() and len(list((out / "points").glob("*.json"))) >= 5, proc,
                  timeout_s=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    again = subprocess.run(_sweep(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "done before" in again.stdout
    assert not list(out.rglob(".*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == ["sw"]
