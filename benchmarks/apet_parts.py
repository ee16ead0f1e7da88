"""ApET's large passes at N=2880, B=8, D=4096 (bfloat16): float32 forms against half-precision inputs.

Times, on CUDA, each product ApET makes at large inputs in its float32 form (the form before
issue 19's third pass) and with the tokens kept in their dtype and a float32 result
(:func:`tokenreduce.ops.wide_bmm`), plus the passes around them; each figure is the median of
20 calls after 3 untimed ones, in three interleaved rounds. It also prints how far the
half-input merge and FPS products lie from the float32 ones::

    python -m benchmarks.apet_parts
"""

from __future__ import annotations

import torch

from tokenreduce import ops

from .common import summarize, time_call


def main() -> None:
    if not torch.cuda.is_available():
        print("apet_parts: CUDA is not available; nothing to time")
        return
    torch.manual_seed(0)
    b, n, d, t, k = 8, 2880, 4096, 320, 10
    tok = torch.randn(b, n, d, device="cuda").bfloat16()
    x = tok.float()
    kept, keptb = x[:, :t].contiguous(), tok[:, :t].contiguous()
    centre, centreb = x[:, :1].transpose(1, 2).contiguous(), tok[:, :1].transpose(1, 2).contiguous()
    sq = x.square().sum(-1)
    target = torch.randint(-1, t, (b, n), device="cuda")
    onehot = target.unsqueeze(1) == torch.arange(t, device="cuda").view(1, t, 1)
    ohf, ohb = onehot.float(), onehot.bfloat16()
    cases = {
        "widen to float32 (tokens / scale)": lambda: tok / torch.ones(b, 1, 1, device="cuda"),
        "peak (aminmax)": lambda: torch.aminmax(tok, dim=-1),
        "squared norms, float32": lambda: torch.linalg.vector_norm(x, dim=-1).square(),
        "FPS step, float32": lambda: torch.baddbmm(sq[:, :1].view(b, 1, 1), x, centre, alpha=-2.0),
        "FPS step, bf16 in / float32 out": lambda: ops.wide_bmm(tok, centreb),
        "similarity, TF32": lambda: ops.cosine_similarity(x, kept),
        "similarity, bf16 in / float32 out": lambda: ops.wide_bmm(tok, keptb.transpose(1, 2)),
        "merge one-hot, float32": lambda: torch.bmm(ohf, x),
        "merge one-hot, bf16 in / float32 out": lambda: ops.wide_bmm(ohb, tok),
        "projection, float32": lambda: torch.bmm(kept[:, :k], x.transpose(1, 2)),
        "projection, bf16 in / float32 out": lambda: ops.wide_bmm(keptb[:, :k], tok.transpose(1, 2)),
    }
    res: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(3):
            for name, f in cases.items():
                torch.backends.cuda.matmul.allow_tf32 = name.endswith("TF32")
                res.setdefault(name, []).append(summarize(time_call(f, "cuda", reps=20, warmup=3))["median_ms"])
        torch.backends.cuda.matmul.allow_tf32 = False
        for name, v in res.items():
            print(f"{name:40s} " + "  ".join(f"{ms:.3f}" for ms in v) + " ms")
        a, h = torch.bmm(ohf, x), ops.wide_bmm(ohb, tok)
        print("merge: largest difference", float((a - h).abs().max() / a.abs().max()), "relative")
        a = torch.baddbmm(sq[:, :1].view(b, 1, 1), x, centre, alpha=-2.0)
        h = sq[:, :1].view(b, 1, 1) - 2 * ops.wide_bmm(tok, centreb)
        print("FPS step: largest difference", float((a - h).abs().max() / a.abs().max()), "relative")


if __name__ == "__main__":
    main()
