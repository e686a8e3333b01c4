//! Seeded fuzzing (issue 15) of the index loader (bit flips, byte edits, truncation, header
//! edits, tensor swaps, dtype relabels, poisoned values), of configurations (extreme values),
//! and of the op's inputs (shapes, dtypes, values, extreme configurations).
//!
//! Every case asserts: no panic; only typed errors; a damaged file is rejected with
//! `IndexFormat` naming it, or loads to exactly the index that was saved; a rejected call leaves
//! the sequences as they were; no output accepted while checks are on holds NaN or infinity;
//! every cached position is read exactly once (sinks ∪ index ∪ window). The default suite runs
//! 12,000 cases; `fuzz_soak` (ignored) runs 110,000 with the seed in `SAAP_FUZZ_SEED`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use saap::config::{MAX_CONTEXT, MAX_SPAN};
use saap::rope::Rope;
use saap::{
    HeadLayout, RopeConfig, RopeKind, RopeScaling, Routing, SaapAttention, SaapConfig, SaapError,
    SaapIndex,
};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Seed of the default suite's run.
const SEED: u64 = 0x5aa9_0015;

/// Counts of one fuzz run, and the first failures of each kind.
#[derive(Debug, Default)]
struct Tally {
    cases: usize,
    /// Cases (files, configurations) accepted and rejected.
    accepted: usize,
    rejected: usize,
    /// Op calls that returned `Ok`, and typed errors.
    calls_ok: usize,
    calls_rejected: usize,
    panics: usize,
    corrupt_accepted: usize,
    untyped_errors: usize,
    silent_non_finite: usize,
    broken_invariants: usize,
    examples: Vec<String>,
}

/// What went wrong in one case.
enum Failure {
    Panic(String),
    CorruptAccepted(String),
    Untyped(String),
    SilentNonFinite(String),
    Invariant(String),
}

impl Tally {
    fn fail(&mut self, failure: Failure) {
        let (count, text) = match failure {
            Failure::Panic(s) => (&mut self.panics, s),
            Failure::CorruptAccepted(s) => (&mut self.corrupt_accepted, s),
            Failure::Untyped(s) => (&mut self.untyped_errors, s),
            Failure::SilentNonFinite(s) => (&mut self.silent_non_finite, s),
            Failure::Invariant(s) => (&mut self.broken_invariants, s),
        };
        *count += 1;
        if self.examples.len() < 20 {
            self.examples.push(text);
        }
    }

    fn failures(&self) -> usize {
        self.panics
            + self.corrupt_accepted
            + self.untyped_errors
            + self.silent_non_finite
            + self.broken_invariants
    }

    fn report(&self, what: &str) {
        eprintln!(
            "{what}: {} cases, {} accepted, {} rejected; {} op calls Ok, {} typed errors; \
             {} panics, {} corrupted files accepted, {} untyped errors, \
             {} silent non-finite outputs, {} broken invariants",
            self.cases,
            self.accepted,
            self.rejected,
            self.calls_ok,
            self.calls_rejected,
            self.panics,
            self.corrupt_accepted,
            self.untyped_errors,
            self.silent_non_finite,
            self.broken_invariants
        );
        assert_eq!(self.failures(), 0, "{what}: {:#?}", self.examples);
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// Runs `f`, turning a panic into a failure.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, Failure> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| Failure::Panic(format!("{what}: {}", panic_message(p))))
}

// ---------------------------------------------------------------------------------------------
// Loader.

/// A mutated file, whether its digests were recomputed (then it is a well-formed forgery that
/// only the loader's other checks can refuse), and what was done.
struct Mutant {
    bytes: Vec<u8>,
    sealed: bool,
    what: String,
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    *items.choose(rng).unwrap()
}

/// A JSON value a careless or hostile editor might write.
fn hostile_json(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(usize::MAX as f64 * 4.0),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(0.5),
        8 => Value::Null,
        9 => json!("NaN"),
        10 => json!([]),
        _ => json!(rng.random_range(0..100_000)),
    }
}

/// Replaces one leaf (number, string, bool, null) of `value`, chosen at random.
fn edit_leaf(rng: &mut StdRng, value: &mut Value) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let key = map
                .keys()
                .nth(rng.random_range(0..map.len()))
                .unwrap()
                .clone();
            edit_leaf(rng, map.get_mut(&key).unwrap());
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.random_range(0..items.len());
            edit_leaf(rng, &mut items[i]);
        }
        leaf => *leaf = hostile_json(rng),
    }
}

fn mutate(rng: &mut StdRng, bytes: &[u8]) -> Mutant {
    let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut file = IndexFile::parse(bytes);
    let names = file.tensor_names();
    let mut out = bytes.to_vec();
    let (what, sealed) = match rng.random_range(0..11) {
        0 => {
            // Bit flips, in the header half of the time (it is the smaller part).
            let flips = rng.random_range(1..=3);
            for _ in 0..flips {
                let end = if rng.random_bool(0.5) {
                    header_len
                } else {
                    out.len()
                };
                let at = rng.random_range(0..end);
                out[at] ^= 1 << rng.random_range(0..8);
            }
            return Mutant {
                bytes: out,
                sealed: false,
                what: format!("{flips} bit flips"),
            };
        }
        1 => {
            let at = rng.random_range(0..out.len());
            let byte = pick(rng, b"\0\xff\"{}[],:0 \n\\9eE-.");
            out[at] = byte;
            return Mutant {
                bytes: out,
                sealed: false,
                what: format!("byte {at} set to {byte:#x}"),
            };
        }
        2 => {
            let len = rng.random_range(0..out.len());
            out.truncate(len);
            return Mutant {
                bytes: out,
                sealed: false,
                what: format!("truncated to {len}"),
            };
        }
        3 => {
            let at = rng.random_range(0..=out.len());
            let extra: Vec<u8> = (0..rng.random_range(1..=16))
                .map(|_| rng.random())
                .collect();
            out.splice(at..at, extra);
            return Mutant {
                bytes: out,
                sealed: false,
                what: format!("bytes inserted at {at}"),
            };
        }
        4 => {
            // A metadata entry edited, removed or added.
            let meta = file.header["__metadata__"].as_object_mut().unwrap();
            let key = meta
                .keys()
                .nth(rng.random_range(0..meta.len()))
                .unwrap()
                .clone();
            let what = match rng.random_range(0..4) {
                0 => {
                    meta.remove(&key);
                    format!("metadata `{key}` removed")
                }
                1 => {
                    meta.insert("extra".into(), json!("1"));
                    "metadata entry added".to_string()
                }
                _ => {
                    let text = meta[&key].as_str().unwrap().to_string();
                    let edited = match serde_json::from_str::<Value>(&text) {
                        Ok(mut v) if rng.random_bool(0.8) => {
                            edit_leaf(rng, &mut v);
                            v.to_string()
                        }
                        _ => hostile_json(rng).to_string(),
                    };
                    meta.insert(key.clone(), Value::String(edited));
                    format!("metadata `{key}` edited")
                }
            };
            (what, rng.random_bool(0.5))
        }
        5 => {
            // A tensor's header entry edited: dtype, shape, offsets.
            let name = pick(rng, &names.iter().collect::<Vec<_>>()).clone();
            let entry = &mut file.header[&name];
            let what = match rng.random_range(0..3) {
                0 => {
                    let dtype = pick(rng, &["F16", "BF16", "F64", "I32", "U32", "I64", "U8"]);
                    entry["dtype"] = json!(dtype);
                    format!("{name} relabelled {dtype}")
                }
                1 => {
                    let shape = entry["shape"].as_array_mut().unwrap();
                    match rng.random_range(0..4) {
                        0 => shape.reverse(),
                        1 => shape.push(json!(1)),
                        2 => {
                            shape.pop();
                        }
                        _ => {
                            let i = rng.random_range(0..shape.len());
                            shape[i] = hostile_json(rng);
                        }
                    }
                    format!("{name} reshaped")
                }
                _ => {
                    edit_leaf(rng, &mut entry["data_offsets"]);
                    format!("{name} offsets edited")
                }
            };
            (what, rng.random_bool(0.5))
        }
        6 => {
            // Two tensors of one size trade data or header entries.
            let sizes: Vec<usize> = names.iter().map(|n| file.tensor_data(n).len()).collect();
            let a = rng.random_range(0..names.len());
            let pairs: Vec<usize> = (0..names.len())
                .filter(|&b| b != a && sizes[b] == sizes[a])
                .collect();
            let Some(&b) = pairs.choose(rng) else {
                return mutate(rng, bytes);
            };
            let (na, nb) = (&names[a], &names[b]);
            if rng.random_bool(0.5) {
                let (da, db) = (file.tensor_data(na).to_vec(), file.tensor_data(nb).to_vec());
                file.tensor_data(na).copy_from_slice(&db);
                file.tensor_data(nb).copy_from_slice(&da);
            } else {
                let offsets = file.header[na]["data_offsets"].clone();
                file.header[na]["data_offsets"] = file.header[nb]["data_offsets"].clone();
                file.header[nb]["data_offsets"] = offsets;
            }
            (format!("{na} swapped with {nb}"), rng.random_bool(0.5))
        }
        7 => {
            // Values poisoned or pushed to extremes: a well-formed forgery.
            let name = pick(rng, &names.iter().collect::<Vec<_>>()).clone();
            let data = file.tensor_data(&name);
            let value = pick(
                rng,
                &[
                    bf16::NAN,
                    bf16::INFINITY,
                    bf16::NEG_INFINITY,
                    bf16::MAX,
                    bf16::from_f32(-1e38),
                    bf16::from_f32(1e30),
                    bf16::MIN_POSITIVE_SUBNORMAL,
                    bf16::NEG_ZERO,
                ],
            );
            let count = rng.random_range(1..=4);
            for _ in 0..count {
                let at = 2 * rng.random_range(0..data.len() / 2);
                data[at..at + 2].copy_from_slice(&value.to_le_bytes());
            }
            (format!("{count} values of {name} set to {value}"), true)
        }
        8 => {
            // The smallest change to one value: the next bf16.
            let name = pick(rng, &names.iter().collect::<Vec<_>>()).clone();
            let data = file.tensor_data(&name);
            let at = 2 * rng.random_range(0..data.len() / 2);
            let x = bf16::from_le_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&bf16::from_bits(x.to_bits() + 1).to_le_bytes());
            (format!("one ulp added to {name}[{}]", at / 2), false)
        }
        9 => {
            // A tensor removed, or renamed.
            let name = pick(rng, &names.iter().collect::<Vec<_>>()).clone();
            let (a, b) = file.offsets(&name);
            let entry = file.header.remove(&name).unwrap();
            if rng.random_bool(0.5) {
                file.header.insert(format!("{name}x"), entry);
            } else {
                file.data.drain(a..b);
                for other in file.tensor_names() {
                    let (oa, ob) = file.offsets(&other);
                    if oa >= b {
                        file.header[&other]["data_offsets"] = json!([oa - (b - a), ob - (b - a)]);
                    }
                }
            }
            (format!("{name} removed or renamed"), rng.random_bool(0.5))
        }
        _ => {
            // The configuration edited field by field, resealed: only validation stands.
            let mut config: Value = serde_json::from_str(&file.metadata("config")).unwrap();
            edit_leaf(rng, &mut config);
            file.set_metadata("config", config.to_string());
            (format!("config edited to {config}"), true)
        }
    };
    if sealed {
        file.reseal();
    }
    Mutant {
        bytes: file.to_bytes(),
        sealed,
        what: format!("{what}{}", if sealed { " (resealed)" } else { "" }),
    }
}

/// Saved indexes of two shapes the loader fuzz starts from.
fn base_files(dir: &Path) -> Vec<(SaapIndex, Vec<u8>)> {
    let mut narrow = config(4, 4, 8, 32, RopeKind::Interleaved);
    narrow.hidden = 8;
    let layers = [(config(6, 2, 16, 8, RopeKind::Neox), 2), (narrow, 1)];
    layers
        .into_iter()
        .enumerate()
        .map(|(i, (config, n))| {
            let index = random_index(&config, n, i as u64);
            let path = dir.join(format!("base{i}.safetensors"));
            index.save(&path).unwrap();
            (index, std::fs::read(&path).unwrap())
        })
        .collect()
}

fn fuzz_loader(seed: u64, cases: usize) -> Tally {
    let dir = tempfile::tempdir().unwrap();
    let bases = base_files(dir.path());
    let path = dir.path().join("fuzzed.safetensors");
    let shown = path.display().to_string();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    for case in 0..cases {
        tally.cases += 1;
        let (index, bytes) = bases.choose(&mut rng).unwrap();
        let mutant = mutate(&mut rng, bytes);
        let what = format!("case {case}: {}", mutant.what);
        std::fs::write(&path, &mutant.bytes).unwrap();
        let loaded = match guarded(&what, || SaapIndex::load(&path, &Device::Cpu)) {
            Err(failure) => {
                tally.fail(failure);
                continue;
            }
            Ok(Err(SaapError::IndexFormat(msg))) if msg.starts_with(&shown) => {
                tally.rejected += 1;
                continue;
            }
            Ok(Err(e)) => {
                tally.fail(Failure::Untyped(format!("{what}: {e:?}")));
                continue;
            }
            Ok(Ok(loaded)) => loaded,
        };
        tally.accepted += 1;
        if !mutant.sealed && !same_index(index, &loaded) {
            tally.fail(Failure::CorruptAccepted(what));
        } else if mutant.sealed {
            // A forgery that passed every check must be safe to run.
            let routing = pick(&mut rng, &[Routing::Classifier, Routing::NearestCentroid]);
            match SaapAttention::from_index(&loaded, 0, &Device::Cpu, DType::F32) {
                Ok(mut op) => {
                    op.set_routing(routing).unwrap();
                    for _ in 0..3 {
                        check_call(&mut op, Subject::default(), &mut rng, &what, &mut tally);
                    }
                }
                Err(e) => tally.fail(Failure::Untyped(format!("{what}: from_index {e:?}"))),
            }
        }
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// Configurations.

fn extreme_usize(rng: &mut StdRng) -> usize {
    let (small, any) = (rng.random_range(0..100_000), rng.random::<u64>() as usize);
    pick(
        rng,
        &[
            0,
            1,
            2,
            3,
            7,
            16,
            1024,
            MAX_SPAN - 1,
            MAX_SPAN,
            MAX_SPAN + 1,
            u32::MAX as usize,
            usize::MAX / 2,
            usize::MAX - 1,
            usize::MAX,
            small,
            any,
        ],
    )
}

fn extreme_f64(rng: &mut StdRng) -> f64 {
    let any = rng.random_range(-10.0..1e6);
    pick(
        rng,
        &[
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -1.0,
            1.0,
            1.0 + 1e-12,
            f64::MIN_POSITIVE,
            5e-324,
            1e308,
            f64::MAX,
            any,
        ],
    )
}

fn random_rope(rng: &mut StdRng, extreme: bool) -> RopeConfig {
    let mut f = |lo: f64, hi: f64| {
        if extreme {
            extreme_f64(rng)
        } else {
            rng.random_range(lo..hi)
        }
    };
    let (theta, factor, a, b) = (f(2.0, 1e6), f(1.0, 64.0), f(0.5, 4.0), f(4.0, 64.0));
    let original = if extreme {
        extreme_usize(rng)
    } else {
        rng.random_range(1..1 << 20)
    };
    let scaling = match rng.random_range(0..3) {
        0 => RopeScaling::None,
        1 => RopeScaling::Llama3 {
            factor,
            low_freq_factor: a,
            high_freq_factor: b,
            original_max_positions: original,
        },
        _ => RopeScaling::Yarn {
            factor,
            original_max_positions: original,
            beta_fast: b,
            beta_slow: a,
        },
    };
    RopeConfig {
        kind: pick(rng, &[RopeKind::Neox, RopeKind::Interleaved]),
        theta,
        scaling,
    }
}

/// The documented limits, checked independently of `validate`.
fn within_limits(c: &SaapConfig) -> bool {
    let l = c.layout;
    (1..=1024).contains(&l.n_q_heads)
        && l.n_kv_heads >= 1
        && l.n_q_heads % l.n_kv_heads == 0
        && (2..=1024).contains(&l.head_dim)
        && l.head_dim % 2 == 0
        && (1..=1 << 16).contains(&c.n_partitions)
        && (1..=c.n_partitions).contains(&c.n_probe)
        && (1..=1 << 16).contains(&c.hidden)
        && c.window <= MAX_SPAN
        && c.sinks <= MAX_SPAN
        && (1..=MAX_SPAN).contains(&c.merge_every)
        && c.rope.theta.is_finite()
        && c.rope.theta > 1.0
}

fn fuzz_configs(seed: u64, cases: usize) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    for case in 0..cases {
        tally.cases += 1;
        // Each field extreme one time in ten, otherwise in a range that mostly validates.
        let mut u = |valid: usize| {
            if rng.random_bool(0.1) {
                extreme_usize(&mut rng)
            } else {
                valid
            }
        };
        let n_kv_heads = u(1 + (case % 4));
        let layout = HeadLayout {
            n_q_heads: u(n_kv_heads.clamp(1, 4) * (1 + case % 3)),
            n_kv_heads,
            head_dim: u(2 * (1 + case % 8)),
        };
        let n_partitions = u(1 + case % 64);
        let (n_probe, window, sinks, merge_every, hidden) = (
            u(1 + case % n_partitions.clamp(1, 64)),
            u(case % 33),
            u(case % 9),
            u(1 + case % 16),
            u(1 + case % 16),
        );
        let extreme = rng.random_bool(0.2);
        let config = SaapConfig {
            layout,
            rope: random_rope(&mut rng, extreme),
            n_partitions,
            n_probe,
            window,
            sinks,
            merge_every,
            hidden,
            keys_budget: extreme.then(|| pick(&mut rng, &[0.0, -0.1, 1.5, f64::NAN, 0.05, 1.0])),
        };
        let what = format!("case {case}: {config:?}");
        let valid = match guarded(&what, || config.validate()) {
            Err(failure) => {
                tally.fail(failure);
                continue;
            }
            Ok(Err(SaapError::Config(_))) => false,
            Ok(Err(e)) => {
                tally.fail(Failure::Untyped(format!("{what}: {e:?}")));
                continue;
            }
            Ok(Ok(())) => true,
        };
        let context = extreme_usize(&mut rng);
        let sized = guarded(&what, || {
            SaapConfig::for_context(layout, config.rope, context).map(|c| c.validate())
        });
        match sized {
            Err(failure) => tally.fail(failure),
            Ok(Ok(Err(e))) => tally.fail(Failure::Invariant(format!(
                "{what}: for_context({context}) gave an invalid config: {e}"
            ))),
            Ok(_) => {}
        }
        if !valid {
            tally.rejected += 1;
            continue;
        }
        tally.accepted += 1;
        if !within_limits(&config) {
            tally.fail(Failure::Invariant(format!(
                "{what}: accepted beyond limits"
            )));
            continue;
        }
        // A valid RoPE has finite tables at every position a sequence can reach.
        let positions = [0, 1, MAX_SPAN, MAX_CONTEXT - 1];
        let tables = guarded(&what, || {
            let rope = Rope::new(&config.rope, layout.head_dim);
            let (cos, sin) = rope
                .tables_at(&positions, (1, 4), DType::F32, &Device::Cpu)
                .unwrap();
            [cos, sin].iter().all(|t| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .all(|x| x.is_finite())
            })
        });
        match tables {
            Err(failure) => tally.fail(failure),
            Ok(false) => tally.fail(Failure::SilentNonFinite(format!(
                "{what}: non-finite RoPE tables"
            ))),
            Ok(true) => {}
        }
        // Small enough to run: a dense op over a few calls.
        if layout.n_q_heads * layout.head_dim <= 256 {
            let mut op = SaapAttention::dense(&config, &Device::Cpu, DType::F32).unwrap();
            for _ in 0..2 {
                check_call(&mut op, Subject::default(), &mut rng, &what, &mut tally);
            }
        }
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// The op's inputs.

/// A tensor of `shape` with values of a random magnitude (sometimes beyond the dtype's range),
/// sometimes with one NaN or infinity.
fn hostile_tensor(rng: &mut StdRng, shape: &[usize], dtype: DType) -> Tensor {
    let scale = if rng.random_bool(0.7) {
        1.0
    } else {
        pick(rng, &[1e-30, 1e-3, 10.0, 300.0, 3e4, 1e19, 1e30, 3e38])
    };
    let seed = rng.random();
    let mut values = randn(&mut common::rng(seed), shape, 1.0)
        .affine(scale, 0.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    if !values.is_empty() && rng.random_bool(0.05) {
        let at = rng.random_range(0..values.len());
        values[at] = pick(rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    }
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A `[B, H, T, D]` input, malformed once in a while (rank, heads, head dim, dtype).
fn input(rng: &mut StdRng, dtype: DType, shape: [usize; 4]) -> Tensor {
    let mut shape = shape.to_vec();
    let dtype = match rng.random_range(0..100) {
        0 => {
            shape.remove(2);
            dtype
        }
        1 => {
            shape[1] += 1;
            dtype
        }
        2 => {
            shape[3] += 2;
            dtype
        }
        3 => pick(rng, &[DType::F32, DType::BF16, DType::F16]),
        _ => dtype,
    };
    hostile_tensor(rng, &shape, dtype)
}

/// Every cached position in exactly one of sinks, index and window; the window bounded.
fn check_invariants(op: &SaapAttention) -> Result<(), String> {
    let config = op.config();
    let lists = op.index_lists().map_err(|e| e.to_string())?;
    for (b, seq) in op.extents().iter().enumerate() {
        if seq.len != op.seq_lens()[b] || seq.indexed_end > seq.len {
            return Err(format!("extent {seq:?} of length {}", op.seq_lens()[b]));
        }
        let Some(heads) = lists.get(b) else { continue };
        let sink_end = config.sinks.min(seq.len);
        if seq.len - seq.indexed_end > config.window.saturating_add(config.merge_every - 1) {
            return Err(format!("window of {seq:?} not merged"));
        }
        for (perm, offsets) in heads {
            let mut ids = perm.clone();
            ids.sort_unstable();
            let expected: Vec<u32> = (sink_end as u32..seq.indexed_end as u32).collect();
            if ids != expected || offsets.windows(2).any(|w| w[0] > w[1]) {
                return Err(format!("index of {seq:?}: {perm:?} at {offsets:?}"));
            }
        }
    }
    Ok(())
}

/// What the fuzz knows of an op: its dtype and whether it checks for NaN and infinity.
#[derive(Clone, Copy)]
struct Subject {
    dtype: DType,
    checked: bool,
}

impl Default for Subject {
    /// A fresh op's: f32, checked.
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            checked: true,
        }
    }
}

/// One random call (prefill, decode or extend, sometimes malformed) and its checks.
fn check_call(
    op: &mut SaapAttention,
    subject: Subject,
    rng: &mut StdRng,
    what: &str,
    tally: &mut Tally,
) {
    let l = op.config().layout;
    let batch = match op.seq_lens().len() {
        0 => rng.random_range(1..=3),
        b if rng.random_bool(0.03) => b + 1,
        b => b,
    };
    let kind = rng.random_range(0..20);
    let t = if kind < 9 {
        if rng.random_bool(0.03) {
            2
        } else {
            1
        }
    } else {
        rng.random_range(1..=12)
    };
    let mut lens: Vec<usize> = (0..batch)
        .map(|_| {
            if rng.random_bool(0.7) {
                t
            } else {
                rng.random_range(0..=t)
            }
        })
        .collect();
    if rng.random_bool(0.03) {
        lens.push(1);
    }
    let d = l.head_dim;
    let q = input(rng, subject.dtype, [batch, l.n_q_heads, t, d]);
    let k = input(rng, subject.dtype, [batch, l.n_kv_heads, t, d]);
    let v = input(rng, subject.dtype, [batch, l.n_kv_heads, t, d]);
    let before = (op.seq_lens().to_vec(), op.extents().to_vec());
    let call = format!(
        "{what}: {} q {:?} {:?} lens {lens:?}",
        ["decode", "prefill", "extend"][usize::from(kind >= 9) + usize::from(kind >= 17)],
        q.dims(),
        q.dtype()
    );
    let result = guarded(&call, || match kind {
        0..=8 => op.decode(&q, &k, &v).map(Some),
        9..=16 => op.prefill(&q, &k, &v, &lens).map(Some),
        _ => op.extend(&k, &v, &lens).map(|()| None),
    });
    match result {
        Err(failure) => tally.fail(failure),
        Ok(Ok(out)) => {
            tally.calls_ok += 1;
            if let Some(out) = out {
                let values = out
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                if values.iter().any(|x| !x.is_finite()) && subject.checked {
                    tally.fail(Failure::SilentNonFinite(call.clone()));
                }
            }
            if let Err(e) = check_invariants(op) {
                tally.fail(Failure::Invariant(format!("{call}: {e}")));
            }
        }
        Ok(Err(
            SaapError::Shape { .. }
            | SaapError::DType { .. }
            | SaapError::NonFinite(_)
            | SaapError::EmptyContext(_),
        )) => {
            tally.calls_rejected += 1;
            if (op.seq_lens().to_vec(), op.extents().to_vec()) != before {
                tally.fail(Failure::Invariant(format!("{call}: rejected but changed")));
            }
        }
        Ok(Err(e)) => tally.fail(Failure::Untyped(format!("{call}: {e:?}"))),
    }
}

/// A random small configuration; one in ten has a window, sinks or merge interval at the limit.
fn random_config(rng: &mut StdRng) -> SaapConfig {
    let hkv = rng.random_range(1..=2);
    let layout = HeadLayout {
        n_q_heads: hkv * rng.random_range(1..=3),
        n_kv_heads: hkv,
        head_dim: pick(rng, &[2, 4, 8, 16]),
    };
    let c = pick(rng, &[1, 2, 5, 16, 21, 64]);
    let mut config = SaapConfig::new(layout, random_rope(rng, false), c).unwrap();
    config.n_probe = rng.random_range(1..=c);
    config.window = rng.random_range(0..=8);
    config.sinks = rng.random_range(0..=4);
    config.merge_every = rng.random_range(1..=6);
    config.hidden = rng.random_range(1..=8);
    if rng.random_bool(0.1) {
        match rng.random_range(0..3) {
            0 => config.window = MAX_SPAN,
            1 => config.sinks = MAX_SPAN,
            _ => config.merge_every = MAX_SPAN,
        }
    }
    config.validate().unwrap();
    config
}

fn fuzz_op(seed: u64, cases: usize) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    for case in 0..cases {
        tally.cases += 1;
        let config = random_config(&mut rng);
        let dtype = pick(&mut rng, &[DType::F32, DType::BF16, DType::F16]);
        let mut op = if rng.random_bool(0.7) {
            // Trained tensors of a random magnitude: huge ones overflow the routing scores
            // into infinities and NaN.
            let scale = pick(&mut rng, &[1.0, 1.0, 1.0, 1e10, 1e20, 1e30]);
            let mut layer = random_index(&config, 1, rng.random())
                .layer(0)
                .unwrap()
                .clone();
            layer.centroids = (layer.centroids * scale).unwrap();
            layer.classifier.w1 = (layer.classifier.w1 * scale).unwrap();
            layer.classifier.w2 = (layer.classifier.w2 * scale).unwrap();
            let index = SaapIndex::new(config.clone(), "fuzz", vec![layer]).unwrap();
            let mut op = SaapAttention::from_index(&index, 0, &Device::Cpu, dtype).unwrap();
            let routing = [
                Routing::Dense,
                Routing::Classifier,
                Routing::NearestCentroid,
            ];
            op.set_routing(pick(&mut rng, &routing)).unwrap();
            op
        } else {
            SaapAttention::dense(&config, &Device::Cpu, dtype).unwrap()
        };
        let subject = Subject {
            dtype,
            checked: rng.random_bool(0.85),
        };
        op.set_check_finite(subject.checked);
        op.set_track_reads(rng.random_bool(0.5));
        let what = format!("case {case}: {dtype:?} {:?} {config:?}", op.routing());
        for _ in 0..rng.random_range(1..=6) {
            check_call(&mut op, subject, &mut rng, &what, &mut tally);
        }
    }
    tally
}

#[test]
fn fuzz_index_loader() {
    fuzz_loader(SEED, 5_000).report("index loader");
}

#[test]
fn fuzz_configurations() {
    fuzz_configs(SEED, 4_000).report("configurations");
}

#[test]
fn fuzz_op_inputs() {
    fuzz_op(SEED, 3_000).report("op inputs");
}

/// 110,000 cases; `SAAP_FUZZ_SEED` picks the seed (default: the suite's).
#[test]
#[ignore = "soak: minutes; run with --ignored"]
fn fuzz_soak() {
    let seed = std::env::var("SAAP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    eprintln!("seed {seed}");
    fuzz_loader(seed, 50_000).report("index loader (soak)");
    fuzz_configs(seed, 30_000).report("configurations (soak)");
    fuzz_op(seed, 30_000).report("op inputs (soak)");
}
