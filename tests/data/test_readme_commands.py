"""README's "Your own data" commands, run as printed (through bash, quotes and all) on a small image folder.

Only `.venv/bin/python` becomes this interpreter, and flags are appended to make the runs tiny (a later flag or
override wins over an earlier one, in argparse and in Hydra alike); the commands themselves are not edited."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data.shapes import WorldConfig, make_sample
from tests.conftest import TINY_TOKENIZER

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = {"data.convert": ["--shard-size", "2"],  # 20 images -> shards 00000..00009, as the commands expect
        "tokenizer.train": [*TINY_TOKENIZER, "train.val_batches=1"]}


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block after `heading`."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_own_data_commands_run_as_printed(tmp_path):
    lines = readme_block("## Your own data")
    assert [line.split()[2] for line in lines] == ["data.convert", "data.stats", "tokenizer.train"]
    (tmp_path / "photos").mkdir()
    rows = []
    for i in range(20):
        s = make_sample(WorldConfig(), "train", i)
        s["image"].save(tmp_path / "photos" / f"img{i:02d}.png")
        rows.append({"file": f"img{i:02d}.png", "caption": s["caption"]})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = []
    for line in lines:
        assert line.startswith(".venv/bin/python -m "), line
        module = line.split()[2]
        extra = " ".join(f"'{a}'" for a in TINY.get(module, []))
        command = line.split("#")[0].replace(".venv/bin/python", sys.executable, 1) + " " + extra
        r = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
        outputs.append(r.stdout)
    assert sorted(p.name for p in (tmp_path / "shards" / "mine").glob("*.tar")) == [f"{i:05d}.tar" for i in range(10)]
    stats = json.loads(outputs[1].strip().splitlines()[-1])
    assert stats["read"] == 20
    assert list(tmp_path.glob("runs/tokenizer/*/tokenizer/config.json")), "the tokenizer run wrote no model"
