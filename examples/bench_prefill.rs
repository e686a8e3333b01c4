//! Causal prefill attention on the GPU: the tensor-core kernel behind `SaapAttention::prefill`
//! (`saap::attend::prefill_attention`, bf16) for one layer of Llama-3.1-8B (32 q / 8 KV heads,
//! d 128) and of Qwen2.5-0.5B (14 q / 2 KV heads, d 64), the whole prompt as one chunk. One
//! `JSON {...}` line per (shape, n, batch): median milliseconds and TFLOP/s, counting the causal
//! half of 4·B·Hq·n²·D as FlashAttention does. Pair it with `bench/fa2_prefill_anchor.py` (the
//! same shapes through PyTorch's FlashAttention-2) in the same GPU call.
//!
//! Usage: `bench_prefill [LENGTHS] [BATCHES]`, default `8192,32768,131072 1,4`.

use candle_core::{DType, Device, Tensor};
use saap::attend::prefill_attention;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `(name, query heads, KV heads, head dim)`.
const SHAPES: [(&str, usize, usize, usize); 2] =
    [("llama3.1-8b", 32, 8, 128), ("qwen2.5-0.5b", 14, 2, 64)];

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = |i: usize, default: &[usize]| -> Vec<usize> {
        args.get(i).map_or(default.to_vec(), |s| {
            s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
        })
    };
    let lens = list(0, &[8192, 32768, 131072]);
    let batches = list(1, &[1, 4]);
    let dev = Device::new_cuda(0)?;
    for (name, hq, hkv, d) in SHAPES {
        for &n in &lens {
            for &b in &batches {
                let randn = |h: usize| -> Res<Tensor> {
                    Ok(Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?.to_dtype(DType::BF16)?)
                };
                let (q, k, v) = (randn(hq)?, randn(hkv)?, randn(hkv)?);
                let (starts, lens) = (vec![0; b], vec![n; b]);
                let scale = 1.0 / (d as f32).sqrt();
                let iters = if n >= 65536 { 3 } else { 10 };
                let mut times = Vec::with_capacity(iters);
                for i in 0..iters + 1 {
                    dev.synchronize()?;
                    let t0 = Instant::now();
                    let out = prefill_attention(&q, &k, &v, &starts, &lens, scale)?;
                    dev.synchronize()?;
                    if i > 0 {
                        times.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                    drop(out);
                }
                times.sort_by(f64::total_cmp);
                let ms = times[times.len() / 2];
                let flops = 4.0 * (b * hq * d) as f64 * (n as f64).powi(2) / 2.0;
                println!(
                    "JSON {{\"kind\":\"saap_prefill\",\"shape\":\"{name}\",\"n\":{n},\"batch\":{b},\"ms\":{ms:.3},\"tflops\":{:.1}}}",
                    flops / ms / 1e9
                );
            }
        }
    }
    Ok(())
}
