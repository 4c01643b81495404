"""What a pod log shows (output to a pipe, not a terminal): a line per `log_every` steps,
eval on its own line, a closing line, and nothing else on a CPU run - no libtpu start-up
errors, no TFDS "Downloading and preparing" lines for embedded data; a finished run re-run
says so; `profile_steps` writes a trace TensorBoard opens."""

import glob
import os
import subprocess
import sys

from _util import REPO, cli_flags, cpu_env


def _run(*args, env):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_log_lines_eval_line_closing_line_and_no_noise(tmp_path):
    env = {k: v for k, v in cpu_env().items() if k != "JAX_PLATFORMS"}  # as a user runs it
    workdir = tmp_path / "run"
    args = ["--config=configs/lm.py:demo", f"--workdir={workdir}",
            *cli_flags(num_steps=6, log_every=2, eval_every=4, profile_steps=2),
            f"--config.data.data_dir={tmp_path / 'data'}"]  # a fresh data_dir: the corpus is built
    result = _run(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.splitlines()
    assert [line.split()[1] for line in out if line.startswith("step ")] == ["2/6", "4/6", "6/6"], out
    step = next(line for line in out if line.startswith("step 4/6"))
    for field in ("loss ", "lr ", "tokens/s", "mfu "):
        assert field in step, step
    assert [line.split(":")[0] for line in out if line.startswith("eval")] == ["eval at step 4", "eval at step 6"]
    assert "loss" in out[-2] and "accuracy" in out[-2]
    assert out[-1].startswith("done: step 6/6 (this run 6 steps") and "eval loss" in out[-1], out
    assert len(out) == 6, out  # nothing else: no TFDS "Downloading and preparing dataset"
    err = result.stderr.splitlines()
    assert err == [f"profiled steps 3-4: {workdir / 'tb'}"], err  # no libtpu errors, no absl warnings
    assert glob.glob(str(workdir / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))

    again = _run(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == "nothing to train: num_steps=6, the run is at step 6 (raise --config.num_steps to go on)"
    assert again.stderr.strip() == "resumed from step 6"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # nothing new written
