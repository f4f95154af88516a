"""The command line: errors are readable and exit non-zero before any work starts."""

import os
import subprocess
import sys

import yaml


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_bad_config_lists_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lora": {"r": 0}, "training": {"learnig_rate": 1}}))
    result = _run("--config", str(bad), "ray.num_workers=zero")
    assert result.returncode == 2
    err = " ".join(result.stderr.split())
    assert "3 problem(s)" in err
    assert "lora.r = 0" in err and "did you mean 'learning_rate'?" in err and "ray.num_workers = 'zero'" in err
    assert "Traceback" not in result.stderr


def test_module_entrypoint_has_help():
    result = _run("--help")
    assert result.returncode == 0 and "--config" in result.stdout


def test_a_path_or_command_printed_to_copy_is_never_wrapped_at_the_terminals_width(tmp_path):
    """`make demo` ends by printing the command that serves the adapter again; a console wrapped at the terminal's
    width broke it inside the adapter path. The same console prints errors: a long path must come out on one line."""
    missing = tmp_path / ("a-folder-name-longer-than-the-terminal-is-wide" * 2) / "config.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", str(missing)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "40"},
    )
    assert result.returncode == 2, result.stderr
    assert any(str(missing) in line for line in result.stderr.splitlines()), result.stderr
