"""Benchmark: ULD forward + backward, eager vs Triton kernels (and Liger's fused-linear JSD as a peer).

    python benchmarks/uld.py                       # default shapes, bf16
    python benchmarks/uld.py --shapes 4096x151936 --hidden 896 --reps 10 --topk 64

Prints one table: median time of forward + backward over ``--reps`` runs (CUDA events, after ``--warmup``
runs) and peak extra memory (max allocated during the run minus what was allocated before it, inputs
excluded). Needs CUDA; refuses otherwise. Cases per shape N × V (teacher vocabulary = student vocabulary,
hidden size H for the fused-linear cases):

* eager ULD from logits: softmax(fp32), full-row sort, L1 (the formula of kat.losses.uld, written here
  because kat_kernels must not import kat);
* kat_kernels.uld.uld_loss from logits;
* kat.losses.uld.uld_loss_chunked from logits (exact, torch sort, 1024-row blocks);
* eager linear + ULD (the student logits materialised);
* kat_kernels.fused_linear_uld.fused_linear_uld_loss (full teacher logits; and a top-k cache with ``--topk`` > 0);
* kat.losses.uld.fused_linear_uld_loss_chunked (exact, torch sort, Liger's block size);
* Liger ``LigerFusedLinearJSD`` (teacher given as hidden states + its own head), when liger_kernel imports.

Synthetic logits: Gaussian with standard deviation ``--scale`` (student) and student + noise (teacher).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_uld(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over rows of Σ_r |sort↓softmax(s)[r] − sort↓softmax(t)[r]| (equal vocabularies)."""
    ps = torch.softmax(s.float(), dim=-1).sort(dim=-1, descending=True).values  # (N, V)
    pt = torch.softmax(t.detach().float(), dim=-1).sort(dim=-1, descending=True).values  # (N, V)
    return (ps - pt).abs().sum(dim=-1).mean()


def measure(fn, leaves, reps: int, warmup: int) -> tuple[str, str]:
    """Median ms of fn().backward() and peak extra GiB; 'OOM' when it does not fit."""
    def clear():
        for x in leaves:
            x.grad = None

    try:
        for _ in range(warmup):
            clear()
            fn().backward()
        torch.cuda.synchronize()
        clear()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            clear()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn().backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        clear()
        return f"{statistics.median(times):.2f}", f"{peak:.2f}"
    except torch.cuda.OutOfMemoryError:
        clear()
        torch.cuda.empty_cache()
        return "OOM", "OOM"
    except Exception as exc:  # noqa: BLE001 - one failing case (a compile error, say) must not hide the others
        import traceback

        traceback.print_exc()
        clear()
        torch.cuda.empty_cache()
        return f"error: {type(exc).__name__}: {exc}"[:100], "–"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x151936,1024x151936,4096x32000",
                    help="comma-separated NxV (rows x vocabulary)")
    ap.add_argument("--hidden", type=int, default=896, help="hidden size H of the fused-linear cases")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--scale", type=float, default=3.0, help="std of the synthetic student logits")
    ap.add_argument("--noise", type=float, default=1.0, help="std of teacher − student logits")
    ap.add_argument("--topk", type=int, default=64, help="k of the top-k cache case (0 = skip it)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-eager", action="store_true", help="skip the eager cases (they need ~30 GiB)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/uld.py needs a CUDA device; none is available. Nothing was measured.",
              file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes must look like 4096x151936,1024x32000, got {args.shapes!r}")

    from kat_kernels import uld as K  # after the CUDA check: importing triton needs no GPU, launching does
    from kat_kernels import fused_linear_uld as FK

    try:  # the bounded-memory torch forms (kat itself; the other eager case above is standalone)
        from kat.losses.uld import fused_linear_uld_loss_chunked, uld_loss_chunked
    except ImportError:
        def uld_loss_chunked(*args, **kwargs):
            raise RuntimeError("kat is not importable here")
        fused_linear_uld_loss_chunked = uld_loss_chunked

    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        LigerFusedLinearJSD = None

    dtype, dev, hid = DTYPES[args.dtype], "cuda", args.hidden
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for n, v in shapes:
        s = (torch.randn(n, v, device=dev, generator=g) * args.scale).to(dtype).requires_grad_(True)
        t = (s.detach().float() + args.noise * torch.randn(n, v, device=dev, generator=g)).to(dtype)
        label = f"{n} x {v}"
        if not args.skip_eager:
            rows.append(("eager ULD from logits", label, *measure(lambda: eager_uld(s, t), [s], args.reps,
                                                                  args.warmup)))
        rows.append(("kat_kernels.uld.uld_loss", label, *measure(lambda: K.uld_loss(s, t), [s], args.reps,
                                                                 args.warmup)))
        rows.append(("torch chunked (kat.losses.uld.uld_loss_chunked)", label,
                     *measure(lambda: uld_loss_chunked(s, t), [s], args.reps, args.warmup)))
        del s
        h = (torch.randn(n, hid, device=dev, generator=g)).to(dtype).requires_grad_(True)
        w = (torch.randn(v, hid, device=dev, generator=g) * hid ** -0.5 * args.scale).to(dtype)
        w.requires_grad_(True)
        flabel = f"{n} x {hid} -> {v}"
        if not args.skip_eager:
            rows.append(("eager linear + ULD", flabel, *measure(lambda: eager_uld(h @ w.t(), t), [h, w],
                                                               args.reps, args.warmup)))
        rows.append(("kat fused_linear_uld_loss", flabel,
                     *measure(lambda: FK.fused_linear_uld_loss(h, w, t), [h, w], args.reps, args.warmup)))
        rows.append(("torch fused-linear chunked (kat.losses.uld.fused_linear_uld_loss_chunked)", flabel,
                     *measure(lambda: fused_linear_uld_loss_chunked(h, w, t), [h, w], args.reps, args.warmup)))
        if args.topk > 0:
            top = torch.log_softmax(t.float(), dim=-1).topk(args.topk, dim=-1).values
            tail = (1.0 - top.exp().sum(-1)).clamp_min(0.0)
            rows.append((f"kat fused_linear_uld_loss top-{args.topk}", flabel,
                         *measure(lambda: FK.fused_linear_uld_loss(h, w, teacher_topk_logprobs=top,
                                                                  teacher_tail_mass=tail),
                                  [h, w], args.reps, args.warmup)))
            del top, tail
        if LigerFusedLinearJSD is not None:
            jsd = LigerFusedLinearJSD()
            th = torch.randn(n, hid, device=dev, generator=g).to(dtype)
            tw = (torch.randn(v, hid, device=dev, generator=g) * hid ** -0.5 * args.scale).to(dtype)
            rows.append(("Liger fused-linear JSD", flabel,
                         *measure(lambda: jsd(h, w, th, tw, None), [h, w], args.reps, args.warmup)))  # shift_labels=None: all rows
            del th, tw
        else:
            rows.append(("Liger fused-linear JSD", flabel, "n/a", "n/a"))
        del h, w, t
        torch.cuda.empty_cache()

    print(f"# ULD forward+backward, {args.dtype}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of {args.reps} after {args.warmup} warm-up; extra = peak allocated above the inputs")
    head = ("case", "shape", "time (ms)", "extra memory (GiB)")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(fmt.format(*head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt.format(*r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
