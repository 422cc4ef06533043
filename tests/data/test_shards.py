"""Shards: the img2dataset layout round trip, pattern expansion, and every bad input a crawl holds."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest

from data.shapes import WorldConfig, make_sample
from data.shards import DecodePolicy, ReadStats, ShardError, ShardWriter, expand_shards, iter_samples
from tests.conftest import run_module
from tests.data.badinputs import CASES, write_bad_shard, write_truncated_shard


def test_round_trip_keeps_images_captions_and_metadata(tmp_path):
    world = WorldConfig()
    samples = [make_sample(world, "train", i) for i in range(25)]
    with ShardWriter(str(tmp_path), shard_size=10) as w:
        keys = [w.write(s) for s in samples]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(re.fullmatch(r"\d{9}", k) for k in keys) and keys[10] == "000010000"
    with tarfile.open(tmp_path / "00000.tar") as t:
        assert sorted(t.getnames()[:3]) == ["000000000.json", "000000000.png", "000000000.txt"]
        # whole-second mtimes: plain ustar headers, no PAX header per member (a float mtime doubles the headers)
        assert all(not m.pax_headers and isinstance(m.mtime, int) for m in t.getmembers())
    stats = ReadStats()
    back = list(iter_samples(str(tmp_path), stats=stats))
    assert stats.read == 25 and not stats.skipped and stats.shards == 3
    for s, b in zip(samples, back):
        assert np.array_equal(np.asarray(s["image"]), np.asarray(b["image"]))  # PNG is lossless
        assert b["caption"] == s["caption"]
        assert b["meta"]["scene"] == s["meta"]["scene"] and b["meta"]["qa"] == s["meta"]["qa"]


def test_patterns_expand_and_no_match_is_one_line(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(str(tmp_path / d), shard_size=1) as w:
            for i in range(3):
                w.write(make_sample(WorldConfig(), "val", i))
    assert len(expand_shards(str(tmp_path / "a"))) == 3
    assert len(expand_shards(str(tmp_path / "a" / "{00000..00001}.tar"))) == 2
    assert len(expand_shards(str(tmp_path / "*" / "*.tar"))) == 6
    assert len(expand_shards(f"{tmp_path / 'a'}::{tmp_path / 'b' / '00002.tar'}")) == 4
    with pytest.raises(ShardError) as e:
        expand_shards(str(tmp_path / "missing" / "{00000..00003}.tar"))
    assert "\n" not in str(e.value) and "missing" in str(e.value)


def test_every_bad_input_is_skipped_or_normalised_and_counted(tmp_path):
    keys = write_bad_shard(tmp_path / "00000.tar")
    stats = ReadStats()
    got = {s["key"]: s for s in iter_samples(str(tmp_path), DecodePolicy(), stats)}
    expected_skips, expected_notes = Counter(), Counter()
    for key, name in keys.items():
        kind, reason = CASES[name][1]
        if kind == "skip":
            assert key not in got, f"{name} should have been skipped"
            expected_skips[reason] += 1
        else:
            assert key in got, f"{name} is valid and must not be lost"
            img = got[key]["image"]
            assert img.mode == "RGB" and min(img.size) >= 8
            if reason:
                expected_notes[reason] += 1
    assert stats.skipped == expected_skips
    assert all(stats.normalised[k] >= v for k, v in expected_notes.items()), stats.normalised
    assert stats.read == len(got) == sum(1 for c in CASES.values() if c[1][0] == "ok")


def test_normalised_content_is_right(tmp_path):
    keys = write_bad_shard(tmp_path / "00000.tar")
    by_name = {keys[s["key"]]: s for s in iter_samples(str(tmp_path))}
    rgba = np.asarray(by_name["rgba"]["image"])
    assert (rgba[:, :20] == 255).all() and (rgba[:, 25:] == [255, 0, 0]).all()  # transparent -> white
    g16 = np.asarray(by_name["sixteen_bit"]["image"])[..., 0]
    assert g16.min() <= 1 and g16.max() >= 254  # the 16-bit range is scaled, not clipped to white
    assert by_name["caption_latin1"]["caption"] == "caf\u00e9 cr\u00e8me"
    assert 0 < len(by_name["caption_8kb"]["caption"]) <= 1000
    assert by_name["json_broken"]["meta"] == {}


def test_require_caption_skips_instead(tmp_path):
    keys = write_bad_shard(tmp_path / "00000.tar")
    stats = ReadStats()
    got = {keys[s["key"]] for s in iter_samples(str(tmp_path), DecodePolicy(require_caption=True), stats)}
    assert "caption_missing" not in got and "caption_empty" not in got
    assert stats.skipped["caption_missing"] == 1 and stats.skipped["caption_empty"] == 1


def test_tar_cut_off_mid_file_keeps_what_came_before(tmp_path):
    write_truncated_shard(tmp_path / "00000.tar", n=10)
    with ShardWriter(str(tmp_path), shard_size=5, start_shard=1) as w:  # a whole shard after the broken one
        for i in range(5):
            w.write(make_sample(WorldConfig(), "val", i))
    stats = ReadStats()
    got = list(iter_samples(str(tmp_path), stats=stats))
    first = [s for s in got if s["url"].endswith("00000.tar")]
    assert 3 <= len(first) < 10  # the samples before the cut survive
    caps = [s["caption"] for s in first]
    assert caps[:-1] == [f"caption {i}" for i in range(len(first) - 1)]
    assert caps[-1] in (f"caption {len(first) - 1}", "")  # the sample at the cut may have lost its caption
    assert len(got) - len(first) == 5  # and the next shard is read normally
    assert stats.skipped["truncated_tar"] == 1


def test_stats_cli_reports_json_on_its_last_line(tmp_path):
    write_bad_shard(tmp_path / "00000.tar")
    write_truncated_shard(tmp_path / "00001.tar")
    proc = run_module("data.stats", str(tmp_path / "*.tar"), "--quiet")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["read"] >= 11 and out["skipped"]["truncated_tar"] == 1
    assert out["skipped"]["too_many_pixels"] == 2 and out["skipped"]["html_not_image"] == 1
    assert out["min_size"] == [40, 30] or out["min_size"][0] * out["min_size"][1] <= 40 * 30
    assert out["samples_per_s"] > 0


def test_stats_cli_with_no_matching_shard_fails_in_one_line(tmp_path):
    proc = run_module("data.stats", str(tmp_path / "nothing-{0..3}.tar"), "--quiet", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no shard matches")
