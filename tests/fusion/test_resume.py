"""Fault tolerance for real: kill -9 a training mid-run, run the same command again, and compare with an
uninterrupted run: same final step, the data stream continued (not restarted), no sample repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_module

ARGS = ["model=test", "seq_len=256", "train.batch_size=4", "text.train_samples=200", "text.vocab_size=300",
        "trainer.max_steps=60", "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", "samples.count=0",
        "checkpoint_every=10", "audit=true", "resume=auto", "trainer.precision=32-true"]


def steps_and_keys(run: Path) -> list[tuple[int, list[str]]]:
    rows = [json.loads(line) for line in (run / "audit" / "samples_rank0.jsonl").read_text().splitlines()]
    return [(r["step"], r["keys"]) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("curriculum", [0, 3000], ids=["plain", "curriculum"])
def test_kill_and_resume_continues_the_stream(tiny_codes, tmp_path, curriculum):
    """With the default curriculum (small scenes first) the tiny shards' restricted epoch is shorter than the run,
    so samples repeat by design: there the resumed stream must still equal the uninterrupted one."""
    common = [f"codes={tiny_codes}", *ARGS, f"curriculum.documents={curriculum}"]
    if curriculum:  # and a task phase from step 30: the resumed stream follows the same schedule
        common.append("task_phases=[{at:30,tasks:{vqa:0.9,t2i:0.1}}]")
    reference = tmp_path / "reference"
    run_module("fusion.train", *common, f"run_dir={reference}")

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fusion.train", *common, f"run_dir={run}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    audit = run / "audit" / "samples_rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint exists and training has moved past it
        if audit.exists() and (run / "checkpoints" / "last.ckpt").exists() and len(audit.read_text().splitlines()) >= 25:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = steps_and_keys(run)[-1][0]
    assert killed_at < 60, "the run finished before it could be killed"

    before = len(steps_and_keys(run))
    run_module("fusion.train", *common, f"run_dir={run}")  # the same command again
    rows = steps_and_keys(run)
    # the resumed run's first row is the step after its checkpoint (a kill between the checkpoint and that step's
    # audit row leaves nothing to redo, so the step count need not go back)
    resumed_from = rows[before][0] - 1
    lost = killed_at - resumed_from
    print(f"resume figure: killed at step {killed_at}, resumed from {resumed_from}: {lost} steps lost "
          f"(checkpoint_every=10)")
    assert resumed_from % 10 == 0 and 0 <= lost <= 10, f"resumed from step {resumed_from}, {lost} steps lost"
    assert json.loads((run / "audit" / "weights_rank0.json").read_text())["step"] == 60

    # the stream after the resume is exactly the uninterrupted run's stream from that step on
    final = {}
    for step, keys in rows:  # later rows (after the resume) overwrite the lost ones
        final[step] = keys
    ref = dict(steps_and_keys(reference))
    assert final == ref
    seen = [k for s in sorted(final) for k in final[s]]
    if not curriculum:
        assert len(seen) < 400 and len(seen) == len(set(seen)), "a sample was repeated within the epoch"
