"""Benchmark: eager torch vs kat_kernels.grpo (and Liger's fused-linear GRPO loss when importable).

    python benchmarks/grpo.py            # needs a CUDA GPU; prints one markdown table

Cases (shapes of the device README's anchors):
* group advantages, 1024 prompts × 16 rollouts: TRL's eager formula, kat's torch reference, the Triton kernel;
* Step-SRPO credit assignment to a [16384, 2048] token grid: torch reference vs kernel;
* policy loss from hidden states, forward + backward, 8 × 2048 tokens, hidden 896, vocab 151,936, bf16:
  eager (logits materialised), the fused kernel (head gradient accumulated in bf16, and in fp32), Liger.
Timing: median of 5 runs after 2 warm-ups, CUDA events. Memory: peak allocated above what was allocated before
the call (the gradients of hidden and weight included, for every implementation alike).
"""
from __future__ import annotations

import statistics
import sys

import torch


def _time_ms(fn, reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _extra_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/grpo.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    from kat.losses import grpo as R
    from kat.rl import credit as S
    from kat_kernels import grpo as K

    dev = "cuda"
    torch.manual_seed(0)
    rows: list[tuple[str, str, str, float, float | None]] = []

    # ---- group advantages -------------------------------------------------------------------------------------
    B, G = 1024, 16
    r = torch.randint(0, 2, (B * G,), device=dev).float()

    def trl_eager():  # TRL's formula: mean/std per group, repeat_interleave back
        g = r.view(-1, G)
        mean = g.mean(1).repeat_interleave(G)
        std = g.std(1).repeat_interleave(G)
        return (r - mean) / (std + 1e-6)

    shape = f"{B} prompts × {G}"
    for name, fn in [
        ("eager (TRL formula)", trl_eager),
        ("kat torch reference", lambda: R.group_advantages(r, G)),
        ("kat Triton kernel", lambda: K.group_advantages(r, G)),
        ("kat Triton kernel, scale=batch", lambda: K.group_advantages(r, G, scale="batch")),
    ]:
        try:
            rows.append(("group advantages", shape, name, _time_ms(fn), None))
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
            rows.append(("group advantages", shape, f"{name}: {type(exc).__name__}: {exc}"[:120], float("nan"), None))

    # ---- Step-SRPO credit assignment --------------------------------------------------------------------------
    T = 2048
    j = torch.randint(-1, 2, (B * G,), device=dev).float()
    a = torch.rand(B * G, device=dev)
    lengths = torch.randint(1, T + 1, (B * G,), device=dev)
    bnd = torch.minimum(torch.randint(2, 40, (B * G,), device=dev), lengths)
    mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
    seg = S.segment_ids_from_boundaries(bnd, mask)
    shape = f"{B * G} × {T} tokens"
    for name, fn in [
        ("kat torch reference (segment ids)", lambda: S.step_credit_advantages(j, a, seg, G)),
        ("kat Triton kernel (segment ids)", lambda: K.step_credit_advantages(j, a, seg, G)),
        ("kat Triton kernel (boundaries + mask)",
         lambda: K.step_credit_advantages(j, a, None, G, boundaries=bnd, response_mask=mask)),
    ]:
        try:
            rows.append(("step credit", shape, name, _time_ms(fn), None))
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
            rows.append(("step credit", shape, f"{name}: {type(exc).__name__}: {exc}"[:120], float("nan"), None))
    del seg, mask

    # ---- policy loss from hidden states, fwd + bwd -------------------------------------------------------------
    Bs, Ts, H, V = 8, 2048, 896, 151_936
    N = Bs * Ts
    hidden = (torch.randn(N, H, device=dev) * 0.5).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(V, H, device=dev) * 0.02).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, V, (N,), device=dev)
    tmask = torch.rand(N, device=dev) > 0.1
    with torch.no_grad():
        lp = torch.cat([R.selective_log_softmax(hidden[s : s + 1024] @ weight.t(), tokens[s : s + 1024])
                        for s in range(0, N, 1024)])
    old = lp + 0.05 * torch.randn(N, device=dev)
    ref = lp + 0.05 * torch.randn(N, device=dev)
    adv_seq = torch.randn(Bs, device=dev)
    adv = adv_seq.repeat_interleave(Ts)
    common = dict(ref_logp=ref, kl_coef=0.04, clip_eps_low=0.2, clip_eps_high=0.28)

    def step(fn):
        def run():
            hidden.grad = None
            weight.grad = None
            fn().backward()
        return run

    cases = [
        ("eager torch (logits materialised)",
         step(lambda: R.policy_loss_from_hidden(hidden, weight, tokens, old, adv, tmask, **common).loss)),
        ("kat fused kernel", step(lambda: K.fused_policy_loss(hidden, weight, tokens, old, adv, tmask, **common).loss)),
        ("kat fused kernel, fp32 head-grad accumulation",
         step(lambda: K.fused_policy_loss(hidden, weight, tokens, old, adv, tmask, grad_weight_fp32=True,
                                          **common).loss)),
    ]
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
                                         use_ref_model=True, compiled=True)
        h3 = hidden.view(Bs, Ts, H)

        def liger_loss():
            out = liger(h3, weight, tokens.view(Bs, Ts), tmask.view(Bs, Ts).long(), adv_seq,
                        ref_per_token_logps=ref.view(Bs, Ts), old_per_token_logps=old.view(Bs, Ts))
            return out[0] if isinstance(out, tuple) else out

        cases.append(("Liger LigerFusedLinearGRPOLoss (compiled, dapo)", step(liger_loss)))
    except ImportError:
        rows.append(("policy loss fwd+bwd", "", "Liger: not installed", float("nan"), None))
    shape = f"{Bs} × {Ts} × {H} → {V:,}"
    for name, fn in cases:
        try:
            rows.append(("policy loss fwd+bwd", shape, name, _time_ms(fn), _extra_gib(fn)))
        except Exception as exc:  # one failing peer must not hide the other rows
            rows.append(("policy loss fwd+bwd", shape, f"{name}: {type(exc).__name__}: {exc}"[:120],
                         float("nan"), None))
        torch.cuda.empty_cache()

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| case | shape | implementation | time (ms) | extra memory (GiB) |")
    print("|---|---|---|---|---|")
    for case, shp, name, ms, gib in rows:
        mem = "–" if gib is None else f"{gib:.2f}"
        print(f"| {case} | {shp} | {name} | {ms:.3f} | {mem} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
