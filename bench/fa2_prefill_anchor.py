# FlashAttention-2 anchor: torch SDPA with the FLASH backend (FlashAttention-2 inside PyTorch),
# bf16. Causal prefill at the shapes of `examples/bench_prefill.rs`: one `JSON {...}` line per
# (shape, n, batch), median time and TFLOP/s, counting the causal half of 4·B·Hq·n²·D as
# FlashAttention's papers do. With a third argument `decode`: one decode step (one query per
# sequence over n cached keys) of the Llama-3.1-8B layer of `examples/bench_report.rs`, median
# time and the K/V bytes read per second.
# Usage: python3 fa2_prefill_anchor.py [LENGTHS] [BATCHES] [decode]
import json, sys
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend

SHAPES = {"llama3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64)}

def median_ms(fn, iters, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]

def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True)

def decode(lens, batches):
    hq, hkv, d = SHAPES["llama3.1-8b"]
    for n in lens:
        for b in batches:
            # Enough layers that L2 (50 MB) never holds the next step's K/V.
            layers = max(2, -(-200_000_000 // (2 * b * hkv * n * d * 2)))
            q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16, device="cuda")
            kv = [(torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device="cuda"),
                   torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device="cuda"))
                  for _ in range(layers)]
            step = [0]
            def run():
                k, v = kv[step[0] % layers]
                step[0] += 1
                return sdpa(q, k, v, False)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                us = 1000 * median_ms(run, iters=50)
            tbs = 2 * b * hkv * n * d * 2 / us / 1e6
            print("JSON " + json.dumps({"kind": "fa2_decode", "shape": "llama3.1-8b", "n": n,
                                        "batch": b, "us": round(us, 1), "tb_s": round(tbs, 2)}),
                  flush=True)
            del q, kv
            torch.cuda.empty_cache()

def main():
    lens = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]
    batches = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,4").split(",")]
    torch.manual_seed(0)
    if len(sys.argv) > 3 and sys.argv[3] == "decode":
        return decode(lens, batches)
    for name, (hq, hkv, d) in SHAPES.items():
        for n in lens:
            for b in batches:
                q = torch.randn(b, hq, n, d, dtype=torch.bfloat16, device="cuda")
                k = torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device="cuda")
                v = torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device="cuda")
                def run():
                    return sdpa(q, k, v, True)
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    try:
                        ms = median_ms(run, iters=3 if n >= 65536 else 10)
                    except RuntimeError as err:
                        # Older FLASH backends refuse enable_gqa: repeat K/V (same kernel work).
                        print(f"# {name} n={n} b={b}: {str(err)[:80]}; repeating K/V", flush=True)
                        k = k.repeat_interleave(hq // hkv, 1)
                        v = v.repeat_interleave(hq // hkv, 1)
                        ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True), iters=3 if n >= 65536 else 10)
                flops = 4 * b * hq * n * n * d / 2
                print("JSON " + json.dumps({"kind": "fa2_prefill", "shape": name, "n": n, "batch": b,
                                            "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}),
                      flush=True)
                del q, k, v
                torch.cuda.empty_cache()

main()
