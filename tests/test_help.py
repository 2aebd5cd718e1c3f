"""`--help` of every command from its schema, `list policies`, and the small messages around them."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from sim import REPO_ROOT
from sim.cli import COMMANDS, main
from sim.help import command_keys, field_comments, type_name


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_key_of_every_command_has_a_type_a_default_and_a_meaning(command, capsys):
    if command in ("calibrate",):
        pytest.importorskip("torch")  # its options live beside the measuring code
    sections = command_keys(command)
    keys = [k for _, ks in sections for k in ks]
    assert command == "list" or keys, command
    missing = [k.key for k in keys if not k.meaning]
    assert not missing, f"{command}: keys without a meaning: {missing}"
    rc, out, _ = run_cli([command, "--help"], capsys)
    assert rc == 0
    for k in keys:
        line = next((ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()[:1] == [k.key]), None)
        assert line is not None, f"{command} --help does not list {k.key}"
        assert k.type in line and k.meaning[:20] in line, line


def test_run_help_lists_the_whole_schema(capsys):
    rc, out, _ = run_cli(["run", "--help"], capsys)
    assert rc == 0 and out.startswith("`python -m sim run")
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    assert lines["hw"].split()[1:3] == ["str", "jetson.yaml"]
    assert lines["cache"].split()[1] == "section" and "cache.slots" in lines["cache"]
    assert lines["engine.prefill"].split()[1:3] == ["bool", "true"]
    assert lines["quant.bits"].split()[1:3] == ["float|null", "null"]
    assert "plug-in" in lines["plugins"] and "replace" in lines["overwrite"]
    assert "python -m sim list policies" in out and "prefetch.name=pregate" in out  # the sections' note
    assert "config=FILE.yaml" in out


def test_sweep_help_separates_its_own_keys_from_the_grid(capsys):
    rc, out, _ = run_cli(["sweep", "--help"], capsys)
    own, grid = out.split("\ngrid keys", 1)
    assert rc == 0 and "executor" in own and "ray.address" in own
    assert "engine.max_tokens" in grid and "\n  overwrite " not in grid and "\n  out " not in grid


def test_comments_of_a_base_dataclass_are_kept():
    from sim.commands.confirm import ConfirmCommandOptions

    docs = field_comments(ConfirmCommandOptions)
    assert "replace" in docs["overwrite"] and "round-robin" in docs["repeats"]  # its own and the base's


def test_type_names():
    assert type_name(int) == "int" and type_name(float | None) == "float|null"
    assert type_name(list[float]) == "list[float]" and type_name(dict[str, int]) == "section"


def test_list_policies_shows_every_policy_with_its_knobs(capsys):
    from policies.registry import FAMILIES

    rc, out, _ = run_cli(["list", "policies"], capsys)
    assert rc == 0
    for fam, reg in FAMILIES.items():
        assert f"  {fam}:" in out
        for name in reg.names():
            assert f"\n    {name} " in out or f"\n    {name}\n" in out, name
    assert "gating.T " in out and "float" in out  # adapmoe's threshold, typed
    assert "hardware profiles" not in out  # that part only
    rc, everything, _ = run_cli(["list"], capsys)
    assert rc == 0 and out.strip() in everything and "hardware profiles: " in everything


def test_a_bad_cache_key_lists_the_size_keys(capsys):
    rc, _, err = run_cli(["run", "cache.nope=1", "out=/nonexistent/never"], capsys)
    assert rc == 2 and "cache.slots" in err and "cache.bytes" in err and "cache.scope" in err, err


@pytest.mark.parametrize("args", [["list"], ["run", "--help"]])
def test_a_closed_pipe_ends_quietly(args):
    cmd = f"{sys.executable} -m sim {' '.join(args)} | head -1 > /dev/null; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(cmd, shell=True, executable="/bin/bash", cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stderr == "" and proc.returncode in (0, 141), proc.stderr


def test_an_unsupported_moe_family_is_named_as_unsupported():
    pytest.importorskip("torch")
    from sim.errors import UserError
    from sim.tracer.families import family_for

    with pytest.raises(UserError) as err:
        family_for(SimpleNamespace(model_type="dbrx"), "ckpt")
    text = str(err.value)
    assert "does not support model type 'dbrx'" in text and "mixtral" in text and "no MoE layers" not in text
