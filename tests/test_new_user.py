"""Issue 15's target: a new user simulates their own model (from its config.json), on their own
hardware YAML, under their own policy file, from the command line, without editing the package.

Run as a user would: `python -m sim` in a subprocess, from a working folder outside the
repository, with every input in that folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from sim.bundled import hwprofiles
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace
from tests.test_plugins import write_plugin  # a `random_evict` cache policy, a file of the user's own

CONFIG_JSON = {  # a small Mixtral-architecture checkpoint's config (made up for the test)
    "model_type": "mixtral", "num_hidden_layers": 6, "num_local_experts": 8, "num_experts_per_tok": 2,
    "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
    "vocab_size": 32000, "torch_dtype": "bfloat16",
}



def _sim(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m sim ARGS` in `cwd`, with the package importable as an install makes it (and
    nothing of the working folder's on the path but what the user names)."""
    import sim

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(Path(sim.__file__).resolve().parent.parent)
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_own_model_own_hardware_own_policy_from_the_cli(tmp_path):
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "config.json").write_text(json.dumps(CONFIG_JSON))
    # my hardware: the bundled RTX 4090 profile with a slower PCIe link, as a file of my own
    hw = yaml.safe_load((hwprofiles() / "rtx4090.yaml").read_text())
    hw["name"] = "my-desktop"
    link = next(iter(hw["links"].values()))
    link["bandwidth_Bps"] = {"value": 12.0e9, "source": "estimate: my PCIe 3.0 x16 slot"}
    (work / "my-desktop.yaml").write_text(yaml.safe_dump(hw, sort_keys=False))
    write_plugin(work, "my_policy")
    tr = random_trace(np.random.default_rng(5), tokens=24, layers=6, experts=8, top_k=2, prefill=4,
                      locality=0.5, name="my-model")
    write_trace(tr, work / "my-trace")

    args = ["run", "trace=my-trace", "model=ckpt", "hw=my-desktop.yaml", "plugins=my_policy.py",
            "policy=baseline", "cache.name=random_evict", "cache.slots=16", "out=res", "report=false"]
    r = _sim(args, work)
    assert r.returncode == 0, r.stderr
    s = json.loads((work / "res" / "summary.json").read_text())
    assert s["tokens_decode"] == 24 and s["cache_slots"] == 16 and 0 < s["hit_rate"] < 1
    cfg = yaml.safe_load((work / "res" / "config.yaml").read_text())
    assert cfg["cache"]["name"] == "random_evict" and cfg["plugins"] == "my_policy.py"
    model = cfg["resolved"]["model_preset"]
    assert (model["layers"], model["experts"], model["top_k"], model["hidden"], model["expert_width"]) == \
        (6, 8, 2, 1024, 2816)
    # the slower link of my profile is what ran: the same run on the stock profile is faster
    r2 = _sim([*[a for a in args if not a.startswith(("hw=", "out="))], "hw=rtx4090.yaml", "out=res2"], work)
    assert r2.returncode == 0, r2.stderr
    s2 = json.loads((work / "res2" / "summary.json").read_text())
    assert s2["tpot_mean_s"] < s["tpot_mean_s"]
    # and the run's own config reruns it, with the same numbers
    r3 = _sim(["run", "config=res/config.yaml", "out=res3", "report=false"], work)
    assert r3.returncode == 0, r3.stderr
    s3 = json.loads((work / "res3" / "summary.json").read_text())
    assert {k: v for k, v in s3.items() if "wall" not in k} == {k: v for k, v in s.items() if "wall" not in k}
