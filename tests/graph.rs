//! Decode steps recorded once and replayed (`SaapAttention::begin_replay`, `DecodeGraph`):
//! replayed steps give what step-by-step decoding gives — outputs within rounding, the same
//! sequences and index afterwards, window merges in between — on the CPU and on CUDA; a whole toy
//! model's step recorded as a CUDA graph gives the eager logits, also after batch items are
//! dropped (`DecodeGraph::retain`); on the CPU the graph runs every step eagerly and bad input is
//! refused. GPU parts skip, with a line saying so, without CUDA.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use saap::graph::{DecodeGraph, GraphDecoder};
use saap::{PageLayout, ReplayClock, RopeKind, Routing, SaapAttention, SaapError, SaapIndex};

/// A decoder of a few layers around the op: embedding, per layer q/k/v/o projections and a
/// residual, then an output projection. Enough for every launch of a step to be recorded.
struct Toy {
    embed: Tensor,
    layers: Vec<[Tensor; 4]>,
    out: Tensor,
    ops: Vec<SaapAttention>,
    heads: (usize, usize, usize),
}

const VOCAB: usize = 50;
const HIDDEN: usize = 64;

impl Toy {
    fn new(index: &SaapIndex, dev: &Device, dtype: DType, seed: u64) -> Self {
        let mut r = rng(seed);
        let l = index.config().layout;
        let (nq, nkv, d) = (l.n_q_heads, l.n_kv_heads, l.head_dim);
        let mut w = |rows: usize, cols: usize| {
            randn(&mut r, &[rows, cols], 1.0 / (rows as f32).sqrt())
                .to_dtype(dtype)
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let embed = w(VOCAB, HIDDEN);
        let layers = (0..index.n_layers())
            .map(|_| {
                [
                    w(HIDDEN, nq * d),
                    w(HIDDEN, nkv * d),
                    w(HIDDEN, nkv * d),
                    w(nq * d, HIDDEN),
                ]
            })
            .collect();
        let out = w(HIDDEN, VOCAB);
        let ops = (0..index.n_layers())
            .map(|layer| SaapAttention::from_index(index, layer, dev, dtype).unwrap())
            .collect();
        Self {
            embed,
            layers,
            out,
            ops,
            heads: (nq, nkv, d),
        }
    }

    /// Logits `[B, T, vocab]` f32; a prefill when `T > 1`, a decode step when `T == 1`.
    fn forward(&mut self, tokens: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let (nq, nkv, d) = self.heads;
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, HIDDEN))?;
        for ([wq, wk, wv, wo], op) in self.layers.iter().zip(&mut self.ops) {
            let heads = |w: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                x.broadcast_matmul(w)?
                    .reshape((b, t, n, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (heads(wq, nq)?, heads(wk, nkv)?, heads(wv, nkv)?);
            let o = if t == 1 {
                op.decode(&q, &k, &v)
            } else {
                op.prefill(&q, &k, &v, lens)
            }
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let o = o.transpose(1, 2)?.reshape((b, t, nq * d))?;
            x = (x + o.broadcast_matmul(wo)?)?;
        }
        x.broadcast_matmul(&self.out)?.to_dtype(DType::F32)
    }

    fn snapshot(&self) -> Self {
        Self {
            embed: self.embed.clone(),
            layers: self.layers.clone(),
            out: self.out.clone(),
            ops: self.ops.iter().map(|op| op.snapshot().unwrap()).collect(),
            heads: self.heads,
        }
    }
}

impl GraphDecoder for Toy {
    type Error = SaapError;

    fn attention_ops(&mut self) -> &mut [SaapAttention] {
        &mut self.ops
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn decode_logits(&mut self, tokens: &Tensor) -> saap::Result<Tensor> {
        let lens = vec![1; tokens.dim(0)?];
        Ok(self.forward(tokens, &lens)?.squeeze(1)?)
    }
}

fn toy_config() -> saap::SaapConfig {
    let mut config = config(8, 2, 64, 32, RopeKind::Neox);
    config.window = 48;
    config.merge_every = 16;
    config
}

/// Ragged prompts of random tokens, `[B, T]`.
fn prompts(seed: u64, lens: &[usize], dev: &Device) -> Tensor {
    let t = lens.iter().copied().max().unwrap();
    let ids = randn(&mut rng(seed), &[lens.len(), t], 1.0)
        .abs()
        .unwrap()
        .affine(15.0, 0.0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .clamp(0u32, VOCAB as u32 - 1)
        .unwrap();
    ids.to_device(dev).unwrap()
}

fn tokens_for_step(seed: u64, step: usize, batch: usize) -> Vec<u32> {
    (0..batch)
        .map(|b| ((seed as usize).wrapping_add(step * 7 + b * 13) % VOCAB) as u32)
        .collect()
}

/// One op: replay mode (each recorded step run once, eagerly) against step-by-step decoding
/// of the same prefilled sequences, through several window merges.
/// `shared`: the replays count on a [`ReplayClock`] the test ticks after each step, as
/// `DecodeGraph` does for a model's layers, instead of the op's own count.
fn replay_case(
    dev: &Device,
    dtype: DType,
    tol: f32,
    (routing, layout): (Routing, PageLayout),
    shared: bool,
) {
    let config = toy_config();
    let index = random_index(&config, 1, 11);
    let mut eager = SaapAttention::from_index(&index, 0, dev, dtype).unwrap();
    eager.set_n_probe(4).unwrap();
    eager.set_page_layout(layout).unwrap();
    eager.set_routing(routing).unwrap();
    eager.set_quest_pages(2).unwrap();
    let mut r = rng(12);
    let lens = [200, 131, 57];
    let b = lens.len();
    let mut qkv = |t: usize| {
        let [q, k, v] = [8, 2, 2].map(|h| {
            randn(&mut r, &[b, h, t, 64], 1.0)
                .to_dtype(dtype)
                .unwrap()
                .to_device(dev)
                .unwrap()
        });
        (q, k, v)
    };
    let (q, k, v) = qkv(200);
    eager.prefill(&q, &k, &v, &lens).unwrap();
    let mut replay = eager.snapshot().unwrap();
    let (mut plans, mut replayed) = (0, 0);
    let mut clock = None;
    for step in 0..120 {
        let (q, k, v) = qkv(1);
        let want = eager.decode(&q, &k, &v).unwrap();
        if replay.replay_progress().is_none() {
            let room = match shared {
                true => {
                    let fresh = ReplayClock::new(b, dev).unwrap();
                    let room = replay.begin_shared_replay(16, &fresh).unwrap();
                    clock = Some(fresh);
                    room
                }
                false => replay.begin_replay(16).unwrap(),
            };
            plans += usize::from(room > 0);
        }
        let got = replay.decode(&q, &k, &v).unwrap();
        if let Some((done, room)) = replay.replay_progress() {
            if let Some(clock) = &clock {
                clock.tick().unwrap();
            }
            replay.replayed().unwrap();
            replayed += 1;
            if done + 1 == room {
                replay.end_replay();
            }
        }
        let diff = max_abs_diff(&want, &got);
        assert!(
            diff <= tol,
            "{dtype:?} step {step}: outputs differ by {diff}"
        );
    }
    replay.end_replay();
    assert!(
        plans >= 3 && replayed >= 60,
        "{plans} replays, {replayed} steps"
    );
    assert_eq!(eager.seq_lens(), replay.seq_lens());
    assert_eq!(eager.extents(), replay.extents());
    assert_eq!(eager.index_lists().unwrap(), replay.index_lists().unwrap());
    if let (Some(a), Some(b)) = (eager.page_bounds(), replay.page_bounds()) {
        assert_eq!(max_abs_diff(a.0, b.0) + max_abs_diff(a.1, b.1), 0.0);
    }
    assert_eq!(eager.page_bounds().is_some(), routing == Routing::Quest);
    assert_eq!(replay.page_layout(), layout);
}

#[test]
fn replayed_steps_match_step_by_step() {
    // The CPU kernels read the same count: the host's bookkeeping is checked without a GPU too.
    for routing in [
        (Routing::Classifier, PageLayout::Consecutive),
        (Routing::Quest, PageLayout::Consecutive),
        (Routing::Quest, PageLayout::PARTITIONS),
        (Routing::Quest, PageLayout::Partitions { page: 4 }),
    ] {
        for shared in [false, true] {
            replay_case(&Device::Cpu, DType::F32, 1e-5, routing, shared);
            replay_case(&Device::Cpu, DType::BF16, 2e-2, routing, shared);
            let Some(dev) = cuda() else { continue };
            replay_case(&dev, DType::F32, 1e-5, routing, shared);
            replay_case(&dev, DType::BF16, 2e-2, routing, shared);
        }
    }
}

/// A toy model's whole step as a CUDA graph: the logits of every step match eager decoding of
/// the same tokens, most steps are graph launches, and the sequences end up the same.
#[test]
fn decode_graph_matches_eager() {
    let Some(dev) = cuda() else { return };
    let config = toy_config();
    let index = random_index(&config, 3, 21);
    let mut eager = Toy::new(&index, &dev, DType::F32, 22);
    for op in &mut eager.ops {
        op.set_n_probe(4).unwrap();
    }
    let lens = [150, 96];
    eager.forward(&prompts(23, &lens, &dev), &lens).unwrap();
    let mut graphed = eager.snapshot();
    let mut graph = DecodeGraph::new(&dev, lens.len(), 32).unwrap();
    let steps = 100;
    for step in 0..steps {
        let tokens = tokens_for_step(24, step, lens.len());
        let input = Tensor::from_slice(&tokens, (lens.len(), 1), &dev).unwrap();
        let want = eager.decode_logits(&input).unwrap();
        let got = graph.step(&mut graphed, &tokens).unwrap();
        let diff = max_abs_diff(&want, &got);
        assert!(diff <= 1e-4, "step {step}: logits differ by {diff}");
    }
    let stats = graph.stats();
    assert_eq!(stats.eager + stats.replays, steps, "{stats:?}");
    assert!(stats.replays >= steps * 3 / 4, "{stats:?}");
    same_state_after_replay(&eager, &mut graphed);
}

/// Changing an op between steps (here ℓ) drops the recording: the next step runs eagerly and
/// records again, and still matches.
#[test]
fn decode_graph_rerecords_after_a_change() {
    let Some(dev) = cuda() else { return };
    let index = random_index(&toy_config(), 2, 31);
    let mut eager = Toy::new(&index, &dev, DType::F32, 32);
    let lens = [120];
    eager.forward(&prompts(33, &lens, &dev), &lens).unwrap();
    let mut graphed = eager.snapshot();
    let mut graph = DecodeGraph::new(&dev, 1, 64).unwrap();
    for step in 0..12 {
        if step == 6 {
            for op in eager.ops.iter_mut().chain(&mut graphed.ops) {
                op.set_n_probe(8).unwrap();
            }
        }
        let tokens = tokens_for_step(34, step, 1);
        let input = Tensor::from_slice(&tokens, (1, 1), &dev).unwrap();
        let want = eager.decode_logits(&input).unwrap();
        let got = graph.step(&mut graphed, &tokens).unwrap();
        assert!(max_abs_diff(&want, &got) <= 1e-4, "step {step}");
    }
    assert_eq!(graph.stats().recordings, 2, "{:?}", graph.stats());
}

/// Without CUDA every step is eager and equals the model's own step; a replay of 0 steps, a
/// wrong number of tokens and a token outside the vocabulary are refused with typed errors.
#[test]
fn decode_graph_on_cpu_runs_eagerly_and_checks_input() {
    let dev = Device::Cpu;
    let index = random_index(&toy_config(), 2, 41);
    let mut eager = Toy::new(&index, &dev, DType::F32, 42);
    let lens = [70, 40];
    eager.forward(&prompts(43, &lens, &dev), &lens).unwrap();
    let mut other = eager.snapshot();
    assert!(matches!(
        other.ops[0].begin_replay(0),
        Err(SaapError::Config(_))
    ));
    let mut graph = DecodeGraph::new(&dev, 2, 8).unwrap();
    assert!(!graph.enabled());
    for step in 0..5 {
        let tokens = tokens_for_step(44, step, 2);
        let input = Tensor::from_slice(&tokens, (2, 1), &dev).unwrap();
        let want = eager.decode_logits(&input).unwrap();
        let got = graph.step(&mut other, &tokens).unwrap();
        assert_eq!(max_abs_diff(&want, &got), 0.0, "step {step}");
        assert_eq!(
            want.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap(),
            got.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()
        );
    }
    assert_eq!(graph.stats().eager, 5);
    assert!(matches!(
        graph.step(&mut other, &[1]),
        Err(SaapError::Shape { .. })
    ));
    assert!(matches!(
        graph.step(&mut other, &[1, VOCAB as u32]),
        Err(SaapError::Config(_))
    ));
    assert!(matches!(
        DecodeGraph::new(&dev, 0, 8),
        Err(SaapError::Config(_))
    ));
}

/// Replay misuse gets typed errors and leaves the sequences right: counting past the planned
/// steps, prefill, extend or snapshot while replaying, replayed() outside a replay; changing ℓ
/// ends the replay and keeps the replayed tokens.
#[test]
fn replay_misuse_is_refused() {
    let dev = Device::Cpu;
    let config = toy_config();
    let mut op =
        SaapAttention::from_index(&random_index(&config, 1, 51), 0, &dev, DType::F32).unwrap();
    let mut r = rng(52);
    let mut qkv = |t: usize| {
        let [q, k, v] = [8, 2, 2].map(|h| randn(&mut r, &[1, h, t, 64], 1.0));
        (q, k, v)
    };
    let (q, k, v) = qkv(100);
    op.prefill(&q, &k, &v, &[100]).unwrap();
    assert!(matches!(op.replayed(), Err(SaapError::Config(_))));
    // A shared clock counts the op's batch (here 1 item).
    let clock = ReplayClock::new(2, &dev).unwrap();
    assert!(matches!(
        op.begin_shared_replay(3, &clock),
        Err(SaapError::Shape { .. })
    ));
    // A replay begins on a clock at 0: one ever ticked is refused.
    let clock = ReplayClock::new(1, &dev).unwrap();
    clock.tick().unwrap();
    assert!(matches!(
        op.begin_shared_replay(3, &clock),
        Err(SaapError::Config(_))
    ));
    assert_eq!(op.replay_progress(), None);
    let room = op.begin_replay(3).unwrap();
    assert_eq!(room, 3);
    assert!(matches!(op.begin_replay(3), Err(SaapError::Config(_))));
    assert!(matches!(op.snapshot(), Err(SaapError::Config(_))));
    assert!(matches!(
        op.extend(&k, &v, &[100]),
        Err(SaapError::Config(_))
    ));
    assert!(matches!(
        op.prefill(&q, &k, &v, &[100]),
        Err(SaapError::Config(_))
    ));
    for _ in 0..room {
        let (q, k, v) = qkv(1);
        op.decode(&q, &k, &v).unwrap();
        op.replayed().unwrap();
    }
    assert_eq!(
        op.seq_lens(),
        &[100],
        "the host view stays at the start of the replay"
    );
    assert!(matches!(op.replayed(), Err(SaapError::Config(_))));
    op.set_n_probe(2).unwrap();
    assert_eq!(op.replay_progress(), None);
    assert_eq!(op.seq_lens(), &[103]);
    let (q, k, v) = qkv(1);
    op.decode(&q, &k, &v).unwrap();
    assert_eq!(op.seq_lens(), &[104]);
}

/// `DecodeGraph::retain` drops batch items mid-decode: the ops leave their replay, the next step
/// records again for the smaller batch, and every step's logits match eager decoding of a model
/// whose ops retained the same items; a step with the old batch's tokens is refused. On the CPU
/// every step is eager; with CUDA the steps before and after the retain are graph launches.
fn graph_retain_case(dev: &Device) {
    let config = toy_config();
    let index = random_index(&config, 2, 61);
    let mut eager = Toy::new(&index, dev, DType::F32, 62);
    for op in &mut eager.ops {
        op.set_n_probe(4).unwrap();
    }
    let lens = [110, 70, 95];
    eager.forward(&prompts(63, &lens, dev), &lens).unwrap();
    let mut graphed = eager.snapshot();
    let mut graph = DecodeGraph::new(dev, lens.len(), 16).unwrap();
    let keep = [true, false, true];
    let mut at_retain = graph.stats();
    for step in 0..40 {
        if step == 10 {
            at_retain = graph.stats();
            for op in &mut eager.ops {
                op.retain(&keep).unwrap();
            }
            graph.retain(&mut graphed, &keep).unwrap();
            assert_eq!(graph.batch(), 2);
            assert!(graphed.ops.iter().all(|op| op.replay_id().is_none()));
            assert!(matches!(
                graph.step(&mut graphed, &[1, 2, 3]),
                Err(SaapError::Shape { .. })
            ));
        }
        let tokens = tokens_for_step(64, step, graph.batch());
        let input = Tensor::from_slice(&tokens, (tokens.len(), 1), dev).unwrap();
        let want = eager.decode_logits(&input).unwrap();
        let got = graph.step(&mut graphed, &tokens).unwrap();
        let diff = max_abs_diff(&want, &got);
        assert!(diff <= 1e-4, "step {step}: logits differ by {diff}");
    }
    let stats = graph.stats();
    if graph.enabled() {
        assert!(at_retain.replays > 0, "{at_retain:?}");
        assert!(
            stats.recordings > at_retain.recordings && stats.replays > stats.eager,
            "{stats:?}, at the retain {at_retain:?}"
        );
    } else {
        assert_eq!(stats.eager, 40, "{stats:?}");
    }
    same_state_after_replay(&eager, &mut graphed);
}

#[test]
fn decode_graph_retain_matches_eager() {
    graph_retain_case(&Device::Cpu);
    let Some(dev) = cuda() else { return };
    graph_retain_case(&dev);
}

/// Ends `graphed`'s replays and checks that its ops hold the sequences and index lists of
/// `eager`'s.
fn same_state_after_replay(eager: &Toy, graphed: &mut Toy) {
    for op in &mut graphed.ops {
        op.end_replay();
    }
    for (a, b) in eager.ops.iter().zip(&graphed.ops) {
        assert_eq!(a.extents(), b.extents());
        assert_eq!(a.index_lists().unwrap(), b.index_lists().unwrap());
    }
}
