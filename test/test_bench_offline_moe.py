"""benchmarks/bench_offline.py --moe-only on a tiny random Qwen3-MoE: both engines load the checkpoint
save_pretrained wrote, decode, and the table carries a row and a same-batch ratio for each."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_offline  # noqa: E402

TINY_MOE = dict(bench_offline.MOE_CONFIG, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                intermediate_size=64)


def test_moe_only_prints_both_engines(capsys):
    bench_offline.main(["--moe-only", "--rounds", "1", "--moe-new-tokens", "3", "--moe-batches", "1", "2",
                        "--moe-dtypes", "float32"], moe_config=TINY_MOE)
    out = capsys.readouterr().out
    assert "random Qwen3-MoE" in out and "float32" in out and "SmolLM2" not in out
    for engine in ("chitu (float32)", "transformers (fp32, grouped_mm experts)", "transformers (fp32, eager experts)"):
        row = next(line for line in out.splitlines() if line.startswith(engine))
        assert len(re.findall(r"\d+\.\d{3}", row)) == 3  # prefill, batch 1, batch 2
    for experts in ("grouped_mm", "eager"):
        assert re.search(rf"chitu \(float32\) decode: batch 1 = [\d.]+x, batch 2 = [\d.]+x transformers \(fp32, "
                         rf"{experts} experts\)", out)
