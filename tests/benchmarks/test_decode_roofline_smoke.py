"""A short run of benchmarks/decode_roofline.py (its figures are in the README): every side decodes,
and the bytes a step needs are SmolLM2's weights (134,515,008 parameters, the head tied to the
embedding table) plus the streams' K/V, with int4 counted in the layout its kernel reads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PARAMS = 134_515_008                   # SmolLM2-135M, the tied table counted once
KV_PER_TOKEN = 2 * 30 * 3 * 64 * 4     # K and V, 30 layers, 3 KV heads of 64, float32


def test_decode_roofline_runs_and_counts_the_bytes_a_step_reads(tmp_path):
    out = tmp_path / "roofline.json"
    r = subprocess.run([sys.executable, "decode_roofline.py", "--threads", "1", "--max-tokens", "3", "--repeat", "1",
                        "--copy-gib", "0.05", "--batch", "1,2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "measured copy" in r.stdout and "== 2 stream(s)" in r.stdout
    summary = json.loads(out.read_text())["summary"]
    for b in (1, 2):
        rows = {side: summary[f"{side} x{b}"] for side in ("lmforge", "lmforge-int4", "hf")}
        kv = rows["lmforge"]["bytes"] - 4 * PARAMS
        context = kv / (b * KV_PER_TOKEN)          # mean prompt length + 3 / 2 (+ 128 bytes of RoPE inv_freq)
        assert 30 < context < 60 and abs(2 * (context - 1.5) - round(2 * (context - 1.5))) < 0.01
        assert rows["hf"]["bytes"] == rows["lmforge"]["bytes"]
        int4_weights = rows["lmforge-int4"]["bytes"] - kv
        assert 0.5 * PARAMS < int4_weights < 0.6 * PARAMS     # 4-bit codes + a 16-bit scale per 32
        for row in rows.values():
            assert row["step_s"]["median"] > 0 and row["bandwidth"] == pytest.approx(row["bytes"] / row["step_s"]["median"])
            assert row["flops"] == pytest.approx(b * 2 * PARAMS, rel=0.02)   # + attention over ~45 tokens
