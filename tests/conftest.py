"""Shared fixtures: tiny real shards on disk, built once per session; no network, no hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(module: str, *args: str, timeout: int = 420) -> list[subprocess.CompletedProcess]:
    """The same command as two 'nodes' on this machine: NODE_RANK 0 and 1, gloo on 127.0.0.1.

    Both are killed if either outlives `timeout`: a hang fails the test instead of stalling the suite.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env={**env, "NODE_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"two-node {module} did not finish within {timeout} s (a hang)")
    for r, res in enumerate(results):
        if res.returncode != 0:
            raise AssertionError(f"node {r} exited {res.returncode}:\n{res.stdout[-5000:]}")
    return results


def run_module(module: str, *args: str, timeout: int = 600, cwd: Path = ROOT, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a real process (what a user types), capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small shapes world: 4 train shards of 100, and 100-scene val/test/holdout."""
    root = tmp_path_factory.mktemp("shapes")
    run_module("data.build", f"data.root={root}", "data.splits.train=400", "data.splits.val=100",
               "data.splits.test=100", "data.splits.holdout=100", "data.shard_size=100", "workers=1")
    return root


# a 12x12-code tokenizer that trains in seconds (f = 4 at 48 px), shared by the tokenizer and fusion tests
TINY_TRAINING = ["train.batch_size=8", "train.val_batch_size=16", "train.val_batches=2", "train.warmup_steps=5",
                 "train.num_workers=0", "trainer.max_steps=12", "trainer.val_check_interval=6", "ceiling_per_type=2"]
# (a VQ codebook and a conv encoder: the other quantizer and encoder than the defaults, so both stay tested)
TINY_TOKENIZER = ["tokenizer.channels=[8,8,16]", "tokenizer.z_channels=16", "quantizer=vq", "tokenizer.codebook_size=64",
                  "tokenizer.encoder=conv", *TINY_TRAINING]


@pytest.fixture(scope="session")
def tiny_tokenizer(shapes_root, tmp_path_factory) -> Path:
    """A trained tokenizer run folder (its export is run/tokenizer)."""
    run = tmp_path_factory.mktemp("tok") / "run"
    run_module("tokenizer.train", f"data.root={shapes_root}", f"run_dir={run}", *TINY_TOKENIZER)
    return run


@pytest.fixture(scope="session")
def tiny_codes(tiny_tokenizer, shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codes") / "codes"
    run_module("tokenizer.pretokenize", f"tokenizer_dir={tiny_tokenizer / 'tokenizer'}", f"data.root={shapes_root}",
               f"out={out}", "workers=1")
    return out


# a patch-local FSQ tokenizer (f = 4, 4 x 4 x 4 = 64 codes): the encoder and quantizer the demo's recipe uses
TINY_FSQ_TOKENIZER = ["tokenizer.channels=[8,8,16]", "tokenizer.z_channels=16", "tokenizer.encoder=patch",
                      "tokenizer.patch_hidden=32", "quantizer=fsq", "tokenizer.fsq_levels=[4,4,4]", *TINY_TRAINING]


@pytest.fixture(scope="session")
def tiny_fsq_codes(shapes_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsqtok") / "run"
    run_module("tokenizer.train", f"data.root={shapes_root}", f"run_dir={run}", *TINY_FSQ_TOKENIZER)
    out = tmp_path_factory.mktemp("fsqcodes") / "codes"
    run_module("tokenizer.pretokenize", f"tokenizer_dir={run / 'tokenizer'}", f"data.root={shapes_root}",
               f"out={out}", "workers=1")
    return out
