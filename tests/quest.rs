//! Quest routing on the CPU: every page read equals dense attention; page bounds, scores, chosen
//! pages, outputs and keys read against a brute-force f64 reference over a ragged batch and
//! window merges, for consecutive pages and pages over the partitions; page scores bound every
//! key of their page; bad input is refused.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use saap::attend::SeqExtent;
use saap::budget::{column_probes, plan_column, PLAN_STEPS};
use saap::config::{MAX_QUEST_PAGES, QUEST_PAGE};
use saap::quest::{page_scores, route, route_by_shares};
use saap::{
    HeadLayout, PageLayout, PageScore, RopeKind, Routing, SaapAttention, SaapConfig, SaapError,
};

const HQ: usize = 6;
const HKV: usize = 2;
const DIM: usize = 16;
const G: usize = HQ / HKV;

/// Window 16, 4 sinks, merges every 8 steps.
fn quest_config() -> SaapConfig {
    config(HQ, HKV, DIM, 8, RopeKind::Neox)
}

fn qkv(r: &mut rand::rngs::StdRng, b: usize, t: usize) -> [Tensor; 3] {
    [HQ, HKV, HKV].map(|h| randn(r, &[b, h, t, DIM], 1.0))
}

/// A dense op prefilled with `lens`, switched to Quest.
fn quest_op(lens: &[usize], seed: u64) -> (SaapAttention, rand::rngs::StdRng) {
    let mut r = rng(seed);
    let mut op = SaapAttention::dense(&quest_config(), &Device::Cpu, DType::F32).unwrap();
    let t = lens.iter().copied().max().unwrap();
    let [q, k, v] = qkv(&mut r, lens.len(), t);
    op.prefill(&q, &k, &v, lens).unwrap();
    op.set_routing(Routing::Quest).unwrap();
    (op, r)
}

/// `[B][Hkv][pos][D]` host copy of a cache tensor.
fn host(cache: &Tensor) -> Vec<Vec<Vec<Vec<f32>>>> {
    (0..cache.dim(0).unwrap())
        .map(|b| cache.get(b).unwrap().to_vec3::<f32>().unwrap())
        .collect()
}

/// Positions of page `p` of an item.
fn page_positions(seq: SeqExtent, sinks: usize, p: usize) -> std::ops::Range<usize> {
    let start = sinks + QUEST_PAGE * p;
    start..(start + QUEST_PAGE).min(seq.indexed_end)
}

fn pages_of(seq: SeqExtent, sinks: usize) -> usize {
    seq.indexed_end.saturating_sub(sinks).div_ceil(QUEST_PAGE)
}

/// `[b][h][page]`: the positions of every page of each item and KV head.
type PageLists = Vec<Vec<Vec<Vec<usize>>>>;

/// The op's pages over `seqs` as its layout cuts them: consecutive positions, or each
/// partition's list of the op's index now cut into pages of the layout's size, partition by
/// partition.
fn page_lists(op: &SaapAttention, seqs: &[SeqExtent]) -> PageLists {
    let sinks = op.config().sinks;
    match op.page_layout() {
        PageLayout::Consecutive => seqs
            .iter()
            .map(|&seq| {
                let pages: Vec<Vec<usize>> = (0..pages_of(seq, sinks))
                    .map(|p| page_positions(seq, sinks, p).collect())
                    .collect();
                vec![pages; HKV]
            })
            .collect(),
        PageLayout::Partitions { page } => op
            .index_lists()
            .unwrap()
            .into_iter()
            .map(|heads| {
                heads
                    .into_iter()
                    .map(|(perm, offsets)| {
                        offsets
                            .windows(2)
                            .flat_map(|w| {
                                let list = &perm[w[0] as usize..w[1] as usize];
                                list.chunks(page)
                                    .map(|keys| keys.iter().map(|&p| p as usize).collect())
                                    .collect::<Vec<_>>()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect(),
    }
}

/// `(min, max)` of one page.
type Bounds = (Vec<f32>, Vec<f32>);

/// Brute-force bounds `[b][h][p]` of the pages `lists`: min and max, or with
/// [`PageScore::Mean`] the mean key as both.
fn bounds_ref(
    keys: &[Vec<Vec<Vec<f32>>>],
    lists: &PageLists,
    score: PageScore,
) -> Vec<Vec<Vec<Bounds>>> {
    lists
        .iter()
        .enumerate()
        .map(|(b, heads)| {
            heads
                .iter()
                .enumerate()
                .map(|(h, pages)| {
                    pages
                        .iter()
                        .map(|positions| {
                            let mut lo = vec![f32::INFINITY; DIM];
                            let mut hi = vec![f32::NEG_INFINITY; DIM];
                            let mut mean = vec![0.0; DIM];
                            for &pos in positions {
                                for d in 0..DIM {
                                    lo[d] = lo[d].min(keys[b][h][pos][d]);
                                    hi[d] = hi[d].max(keys[b][h][pos][d]);
                                    mean[d] += keys[b][h][pos][d] / positions.len() as f32;
                                }
                            }
                            match score {
                                PageScore::Bound => (lo, hi),
                                PageScore::Mean | PageScore::Shares => (mean.clone(), mean),
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The op's bounds equal the brute-force ones (means up to the order of summation); pages past
/// an item's (or with partition pages a head's) own hold zeros.
fn check_bounds(op: &SaapAttention) {
    let (min, max) = op.page_bounds().expect("Quest keeps pages");
    let seqs = op.extents();
    let lists = page_lists(op, seqs);
    let expect = bounds_ref(&host(op.cache().unwrap().0), &lists, op.page_score());
    let near = |got: &[f32], want: &[f32]| {
        got.len() == want.len()
            && got.iter().zip(want).all(|(a, b)| match op.page_score() {
                PageScore::Bound => a == b,
                PageScore::Mean | PageScore::Shares => (a - b).abs() <= 1e-5,
            })
    };
    let longest = lists.iter().flatten().map(Vec::len).max().unwrap();
    assert_eq!(min.dims(), &[seqs.len(), HKV, longest, DIM]);
    let (min, max) = (host(min), host(max));
    for (b, heads) in expect.iter().enumerate() {
        for (h, pages) in heads.iter().enumerate() {
            for p in 0..longest {
                let (lo, hi) = pages
                    .get(p)
                    .cloned()
                    .unwrap_or((vec![0.0; DIM], vec![0.0; DIM]));
                assert!(
                    near(&min[b][h][p], &lo),
                    "min of item {b} head {h} page {p}"
                );
                assert!(
                    near(&max[b][h][p], &hi),
                    "max of item {b} head {h} page {p}"
                );
            }
        }
    }
}

/// One decode step as the reference sees it: the pages each KV group reads, the output
/// `[b][hq][d]` and the keys read, from the cache after the step and the extents it routed with.
struct Step {
    pages: Vec<Vec<Vec<usize>>>,
    out: Vec<Vec<Vec<f64>>>,
    keys_read: usize,
}

/// The step of `op` that routed queries `q` over `routed` extents and pages `lists`.
fn reference(
    op: &SaapAttention,
    q: &Tensor,
    routed: &[SeqExtent],
    lists: &PageLists,
    n_pages: usize,
) -> Step {
    let c = op.config();
    let (sinks, theta) = (c.sinks, c.rope.theta);
    let (keys, values) = op.cache().unwrap();
    let (keys, values) = (host(keys), host(values));
    let bounds = bounds_ref(&keys, lists, op.page_score());
    let q = q.squeeze(2).unwrap();
    let mut step = Step {
        pages: Vec::new(),
        out: Vec::new(),
        keys_read: 0,
    };
    for (b, &seq) in routed.iter().enumerate() {
        let pos = seq.len - 1;
        let q_rot: Vec<Vec<f64>> = q
            .get(b)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|x| rope_ref(x, pos, RopeKind::Neox, theta))
            .collect();
        let (mut item_pages, mut item_out) = (Vec::new(), Vec::new());
        for h in 0..HKV {
            // q·k̄ (or the bound) of head g of the group for page p.
            let head_score = |g: usize, p: usize| {
                let (lo, hi) = &bounds[b][h][p];
                let qh = &q_rot[h * G + g];
                (0..DIM)
                    .map(|d| (qh[d] * lo[d] as f64).max(qh[d] * hi[d] as f64))
                    .sum::<f64>()
            };
            let n_lists = lists[b][h].len();
            // With shares, each head's log-sum-exp over the pages of s·q·k̄ + ln n.
            let scale = 1.0 / (DIM as f64).sqrt();
            let lse: Vec<f64> = (0..G)
                .map(|g| {
                    (0..n_lists)
                        .map(|p| {
                            (scale * head_score(g, p) + (lists[b][h][p].len() as f64).ln()).exp()
                        })
                        .sum::<f64>()
                        .ln()
                })
                .collect();
            let score = |p: usize| match op.page_score() {
                PageScore::Shares => (0..G)
                    .map(|g| (scale * head_score(g, p) - lse[g]).exp())
                    .sum::<f64>(),
                PageScore::Bound | PageScore::Mean => (0..G)
                    .map(|g| head_score(g, p))
                    .fold(f64::NEG_INFINITY, f64::max),
            };
            let mut ranked: Vec<usize> = (0..lists[b][h].len()).collect();
            ranked.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
            ranked.truncate(n_pages);
            let mut ids: Vec<usize> = (0..sinks.min(seq.len)).collect();
            let mut chosen = ranked.clone();
            chosen.sort_unstable();
            for &p in &chosen {
                ids.extend(&lists[b][h][p]);
            }
            ids.extend(seq.indexed_end..seq.len);
            step.keys_read += ids.len();
            for g in 0..G {
                let qh = &q_rot[h * G + g];
                let logits: Vec<f64> = ids
                    .iter()
                    .map(|&j| {
                        let k = &keys[b][h][j];
                        qh.iter().zip(k).map(|(a, &x)| a * x as f64).sum::<f64>()
                            / (DIM as f64).sqrt()
                    })
                    .collect();
                let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                let total: f64 = w.iter().sum();
                let mut o = vec![0.0; DIM];
                for (&j, wj) in ids.iter().zip(&w) {
                    for (x, &v) in o.iter_mut().zip(&values[b][h][j]) {
                        *x += wj / total * v as f64;
                    }
                }
                item_out.push(o);
            }
            item_pages.push(chosen);
        }
        step.pages.push(item_pages);
        step.out.push(item_out);
    }
    step
}

#[test]
fn quest_over_every_page_equals_dense() {
    let config = quest_config();
    let index = random_index(&config, 1, 3);
    // The cache (256 rows) grows during the steps.
    let lens = [250, 41];
    // Without an index (a dense op switched to Quest) and with one, pages over partitions too.
    for (indexed, layout) in [
        (false, PageLayout::Consecutive),
        (true, PageLayout::Consecutive),
        (true, PageLayout::PARTITIONS),
    ] {
        let dev = Device::Cpu;
        let mut dense = match indexed {
            false => SaapAttention::dense(&config, &dev, DType::F32).unwrap(),
            true => SaapAttention::from_index(&index, 0, &dev, DType::F32).unwrap(),
        };
        dense.set_routing(Routing::Dense).unwrap();
        let mut r = rng(4);
        let [q, k, v] = qkv(&mut r, 2, 250);
        dense.prefill(&q, &k, &v, &lens).unwrap();
        let mut by_budget = dense.snapshot().unwrap();
        by_budget.set_page_layout(layout).unwrap();
        by_budget.set_routing(Routing::Quest).unwrap();
        by_budget.set_keys_budget(Some(1.0)).unwrap();
        // More pages than exist: every page.
        let mut by_count = by_budget.snapshot().unwrap();
        by_count.set_keys_budget(None).unwrap();
        by_count.set_quest_pages(MAX_QUEST_PAGES).unwrap();
        for step in 0..40 {
            let [q, k, v] = qkv(&mut r, 2, 1);
            let want = dense.decode(&q, &k, &v).unwrap();
            for quest in [&mut by_budget, &mut by_count] {
                let got = quest.decode(&q, &k, &v).unwrap();
                let diff = max_abs_diff(&want, &got);
                assert!(
                    diff <= 1e-5,
                    "{layout:?}, indexed {indexed}, step {step}: {diff}"
                );
                let read = quest.last_read().unwrap();
                assert_eq!(read.keys_read, read.keys_in_context, "step {step}");
                assert!(read.partitions_probed > 0, "pages were probed");
            }
        }
        assert!(
            by_budget.extents()[1].indexed_end > 41 - config.window,
            "merged"
        );
    }
}

#[test]
fn quest_matches_brute_force_reference() {
    for score in [PageScore::Bound, PageScore::Mean, PageScore::Shares] {
        let (op, r) = quest_op(&[90, 40], 5);
        // The short item has fewer pages than a step reads: its empty slots must read nothing.
        assert!(pages_of(op.extents()[1], op.config().sinks) < N_PAGES);
        matches_brute_force_reference(op, r, score);
    }
}

#[test]
fn partition_pages_match_brute_force_reference() {
    let config = quest_config();
    // Quest's page size, and pages of 3 (not a divisor of 16: rows per page follow the layout).
    for (page, score) in [
        (QUEST_PAGE, PageScore::Mean),
        (QUEST_PAGE, PageScore::Bound),
        (QUEST_PAGE, PageScore::Shares),
        (3, PageScore::Mean),
        (3, PageScore::Bound),
        (3, PageScore::Shares),
    ] {
        let mut op =
            SaapAttention::from_index(&random_index(&config, 1, 6), 0, &Device::Cpu, DType::F32)
                .unwrap();
        let mut r = rng(5);
        let lens = [200, 120, 190];
        let [q, k, v] = qkv(&mut r, 3, 200);
        op.prefill(&q, &k, &v, &lens).unwrap();
        op.set_page_layout(PageLayout::Partitions { page }).unwrap();
        op.set_routing(Routing::Quest).unwrap();
        // Steps with a merge in a batch of three, then the middle item dropped: the kept items'
        // pages, and the host lists the next merges reuse, follow them.
        for _ in 0..10 {
            let [q, k, v] = qkv(&mut r, 3, 1);
            op.decode(&q, &k, &v).unwrap();
        }
        op.retain(&[true, false, true]).unwrap();
        check_bounds(&op);
        // Partitions of more than one page, and short last pages: pages are not partitions.
        let lists = page_lists(&op, op.extents());
        let sizes: Vec<usize> = lists.iter().flatten().flatten().map(Vec::len).collect();
        assert!(sizes.iter().all(|&n| (1..=page).contains(&n)), "{sizes:?}");
        assert!(
            sizes.iter().filter(|&&n| n == page).count() > 4,
            "{sizes:?}"
        );
        assert!(sizes.iter().filter(|&&n| n < page).count() > 4, "{sizes:?}");
        assert!(
            sizes.len() < config.n_partitions * 2 * HKV * 2 * QUEST_PAGE / page,
            "more pages than the lists cut into pages of {page}: {sizes:?}"
        );
        matches_brute_force_reference(op, r, score);
    }
}

/// Pages a step of [`matches_brute_force_reference`] reads per KV group.
const N_PAGES: usize = 3;

/// Pages of `op` (switched to Quest) kept for `score`: their contents, the pages chosen,
/// outputs and keys read over 30 steps with merges, against the reference.
fn matches_brute_force_reference(
    mut op: SaapAttention,
    mut r: rand::rngs::StdRng,
    score: PageScore,
) {
    let n_pages = N_PAGES;
    op.set_quest_pages(n_pages).unwrap();
    op.set_page_score(score).unwrap();
    check_bounds(&op);
    let mut merges = 0;
    for step in 0..30 {
        let before = op.extents().to_vec();
        // The step routes with its token appended, before any merge.
        let routed: Vec<SeqExtent> = before
            .iter()
            .map(|s| SeqExtent {
                len: s.len + 1,
                ..*s
            })
            .collect();
        let lists = page_lists(&op, &routed);
        let [q, k, v] = qkv(&mut r, 2, 1);
        let out = op.decode(&q, &k, &v).unwrap();
        let expect = reference(&op, &q, &routed, &lists, n_pages);
        let out = host(&out);
        for (got, want) in out.iter().flatten().zip(expect.out.iter().flatten()) {
            for (a, e) in got[0].iter().zip(want) {
                assert!((*a as f64 - e).abs() <= 1e-4, "step {step}: {a} vs {e}");
            }
        }
        let read = op.last_read().unwrap();
        assert_eq!(read.keys_read, expect.keys_read, "step {step}");
        let probed: usize = expect.pages.iter().flatten().map(Vec::len).sum();
        assert_eq!(read.partitions_probed, probed, "step {step}");
        if op.extents() != routed.as_slice() {
            merges += 1;
            check_bounds(&op);
        }
    }
    assert!(merges >= 3, "{merges} merges");
}

#[test]
fn page_scores_bound_every_key() {
    let sinks = quest_config().sinks;
    let (op, mut r) = quest_op(&[120, 77], 6);
    let (min, max) = op.page_bounds().unwrap();
    // Any query: the bound does not depend on RoPE.
    let q = randn(&mut r, &[2, HQ, DIM], 2.0);
    let scores = page_scores(&q, min, max).unwrap();
    assert_eq!(scores.dims(), &[2, HQ, min.dim(2).unwrap()]);
    let scores: Vec<Vec<Vec<f32>>> = scores.to_vec3().unwrap();
    let keys = host(op.cache().unwrap().0);
    let q: Vec<Vec<Vec<f32>>> = q.to_vec3().unwrap();
    let mut checked = 0;
    for (b, &seq) in op.extents().iter().enumerate() {
        for head in 0..HQ {
            for (p, &score) in scores[b][head][..pages_of(seq, sinks)].iter().enumerate() {
                for pos in page_positions(seq, sinks, p) {
                    let dot: f32 = q[b][head]
                        .iter()
                        .zip(&keys[b][head / G][pos])
                        .map(|(a, k)| a * k)
                        .sum();
                    assert!(
                        score >= dot - 1e-4 * (1.0 + dot.abs()),
                        "item {b} head {head} page {p}: score {score} < q·k {dot} at {pos}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 900, "{checked} keys checked");
}

/// `quest::route` against a brute-force ranking on small integers (every score exact, ties
/// frequent): each KV group's k best pages by (score descending, page ascending), unfilled pages
/// last, listed in page order with an unfilled page as P, one list per group (`[B, Hkv, k]`).
#[test]
fn route_lists_the_best_pages_in_page_order() {
    let (b, p) = (2, 40);
    let mut r = rng(8);
    let (q, lo, hi, filled) =
        quest_inputs(&mut r, DType::F32, (b, HQ, HKV, DIM, p, 0), &[40, 9], true);
    let host = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (qv, lov, hiv) = (host(&q), host(&lo), host(&hi));
    let fv = filled.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    for k in [1, 5, 12, 40] {
        let probes: Vec<Vec<Vec<u32>>> = route(&q, &lo, &hi, &filled, k)
            .unwrap()
            .0
            .to_vec3()
            .unwrap();
        for item in 0..b {
            for h in 0..HKV {
                let row = |page: usize| (item * HKV + h) * p + page;
                let score = |page: usize| -> f32 {
                    if fv[row(page)] == 0 {
                        return f32::NEG_INFINITY;
                    }
                    let (l, u) = (
                        &lov[row(page) * DIM..][..DIM],
                        &hiv[row(page) * DIM..][..DIM],
                    );
                    (0..G)
                        .map(|g| {
                            let qh = &qv[(item * HQ + h * G + g) * DIM..][..DIM];
                            (0..DIM)
                                .map(|d| (qh[d] * l[d]).max(qh[d] * u[d]))
                                .sum::<f32>()
                        })
                        .fold(f32::NEG_INFINITY, f32::max)
                };
                let mut ranked: Vec<usize> = (0..p).collect();
                ranked.sort_by(|&x, &y| score(y).total_cmp(&score(x)).then(x.cmp(&y)));
                ranked.truncate(k);
                ranked.sort_unstable();
                let want: Vec<u32> = ranked
                    .iter()
                    .map(|&x| if fv[row(x)] == 0 { p as u32 } else { x as u32 })
                    .collect();
                assert_eq!(probes[item].len(), HKV, "k {k}: one list per KV group");
                assert_eq!(probes[item][h], want, "k {k} item {item} group {h}");
            }
        }
    }
}

#[test]
fn quest_bad_inputs_are_refused() {
    let config = quest_config();
    let mut op = SaapAttention::dense(&config, &Device::Cpu, DType::F32).unwrap();
    for n in [0, MAX_QUEST_PAGES + 1] {
        assert!(matches!(op.set_quest_pages(n), Err(SaapError::Config(_))));
    }
    assert!(matches!(
        op.set_keys_budget(Some(f64::NAN)),
        Err(SaapError::Config(_))
    ));
    // Quest needs no index; the trained routings and pages over partitions still do.
    op.set_routing(Routing::Quest).unwrap();
    assert!(matches!(
        op.set_routing(Routing::Classifier),
        Err(SaapError::Config(_))
    ));
    assert!(matches!(
        op.set_page_layout(PageLayout::PARTITIONS),
        Err(SaapError::Config(_))
    ));
    assert_eq!(op.page_layout(), PageLayout::Consecutive);
    // An op that drops its index drops the partition pages' layout with it.
    let mut indexed =
        SaapAttention::from_index(&random_index(&config, 1, 2), 0, &Device::Cpu, DType::F32)
            .unwrap();
    // Pages of no key or of more than Quest's 16 are refused, and change nothing.
    for page in [0, QUEST_PAGE + 1, usize::MAX] {
        assert!(matches!(
            indexed.set_page_layout(PageLayout::Partitions { page }),
            Err(SaapError::Config(_))
        ));
        assert_eq!(indexed.page_layout(), PageLayout::Consecutive);
    }
    indexed.set_page_layout(PageLayout::PARTITIONS).unwrap();
    indexed.drop_index();
    assert_eq!(indexed.page_layout(), PageLayout::Consecutive);
    indexed.set_routing(Routing::Quest).unwrap();
    let bounds = Tensor::zeros((1, 4, 3, DIM), DType::F32, &Device::Cpu).unwrap();
    let q = Tensor::zeros((1, HQ, DIM), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        page_scores(&q, &bounds, &bounds),
        Err(SaapError::Shape { .. })
    ));

    // More pages than the kernels rank: a typed error, the sequence unchanged.
    let mut tiny = config.clone();
    tiny.layout = HeadLayout {
        n_q_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
    };
    let mut long = SaapAttention::dense(&tiny, &Device::Cpu, DType::F32).unwrap();
    let t = tiny.sinks + tiny.window + MAX_QUEST_PAGES * QUEST_PAGE + 1;
    let mut r = rng(7);
    let kv = randn(&mut r, &[1, 1, t, 2], 1.0);
    long.extend(&kv, &kv, &[t]).unwrap();
    long.set_routing(Routing::Quest).unwrap();
    let one = randn(&mut r, &[1, 1, 1, 2], 1.0);
    let err = long.decode(&one, &one, &one).unwrap_err();
    assert!(
        matches!(&err, SaapError::Config(m) if m.contains("pages")),
        "{err}"
    );
    assert_eq!(long.seq_lens(), &[t]);
    assert!(matches!(long.begin_replay(4), Err(SaapError::Config(_))));
}

/// A plan (a Quest curve's, set by a model's glue) moves a Quest layer's pages by the ratio it
/// moves the budget's ℓ: p / u times the budget's pages, p its entry in the column of the
/// partitions per head u the budget allows.
#[test]
fn a_probe_plan_scales_quest_pages() {
    let config = quest_config();
    let (c, g) = (config.n_partitions, config.layout.group_size());
    let (mut op, mut r) = quest_op(&[300, 260], 9);
    let budget = 0.5;
    op.set_keys_budget(Some(budget)).unwrap();
    // Per column: twice the budget's whole ℓ (at most C).
    let plan: Vec<usize> = (0..c * PLAN_STEPS)
        .map(|k| (2 * column_probes(k).floor() as usize).min(c))
        .collect();
    for (planned, step) in [(false, 0), (true, 1), (true, 2), (false, 3)] {
        op.set_probe_plan(planned.then(|| plan.clone())).unwrap();
        let before = op.extents().to_vec();
        let [q, k, v] = qkv(&mut r, 2, 1);
        op.decode(&q, &k, &v).unwrap();
        // (allowed, indexed) per item, as the budget counts them before the step.
        let items: Vec<(f64, usize)> = before
            .iter()
            .map(|s| {
                let fixed = config.sinks + s.len + 1 - s.indexed_end;
                let allowed = (budget * (s.len + 1) as f64).floor() - fixed as f64;
                (allowed, s.len + 1 - fixed)
            })
            .collect();
        let probes = items
            .iter()
            .map(|&(a, n)| a * c as f64 / (g * n) as f64)
            .fold(f64::INFINITY, f64::min);
        let column = plan_column(probes).expect("the budget allows a partition per head");
        let scale = plan[column] as f64 / column_probes(column);
        let pages_at = |scale: f64| {
            items
                .iter()
                .map(|&(a, n)| match a * scale >= n as f64 {
                    true => usize::MAX,
                    false => (a * scale) as usize / QUEST_PAGE,
                })
                .min()
                .unwrap()
                .min(MAX_QUEST_PAGES)
        };
        let (budget_pages, planned_pages) = (pages_at(1.0), pages_at(scale));
        let pages = if planned { planned_pages } else { budget_pages };
        assert_eq!(op.quest_pages(), pages, "step {step}, column {column}");
        assert_ne!(planned_pages, budget_pages, "step {step}, column {column}");
        assert_eq!(
            op.last_read().unwrap().partitions_probed,
            2 * HKV * pages,
            "step {step}"
        );
    }
}

#[test]
fn quest_keys_budget_sets_pages_and_read_stats() {
    let config = quest_config();
    let (mut op, mut r) = quest_op(&[300, 260], 8);
    let budget = 0.3;
    op.set_keys_budget(Some(budget)).unwrap();
    for step in 0..20 {
        let before = op.extents().to_vec();
        let [q, k, v] = qkv(&mut r, 2, 1);
        op.decode(&q, &k, &v).unwrap();
        let read = op.last_read().unwrap();
        // Sinks, window and K whole pages of every group, K the largest that fits every item.
        let fixed: Vec<usize> = before
            .iter()
            .map(|s| config.sinks + s.len + 1 - s.indexed_end)
            .collect();
        let pages = before
            .iter()
            .zip(&fixed)
            .map(|(s, f)| ((budget * (s.len + 1) as f64).floor() as usize - f) / QUEST_PAGE)
            .min()
            .unwrap();
        assert_eq!(op.quest_pages(), pages, "step {step}");
        assert_eq!(read.partitions_probed, 2 * HKV * pages, "step {step}");
        let context: usize = before.iter().map(|s| s.len + 1).sum();
        let most = HKV * (fixed.iter().sum::<usize>() + 2 * QUEST_PAGE * pages);
        // At most one page per group is the partial last one.
        let least = most - 2 * HKV * (QUEST_PAGE - 1);
        assert!(
            (least..=most).contains(&read.keys_read),
            "step {step}: {read:?}"
        );
        assert_eq!(read.keys_in_context, HKV * context);
        assert_eq!(read.window_and_sinks, HKV * fixed.iter().sum::<usize>());
        assert!(read.selectivity() <= budget, "{read:?}");
    }
}

/// Under a keys budget, partition pages count as the item's average page (each partition's
/// last page is short): the pages a step reads are the allowed keys over that size, and so the
/// keys read stay near the budget where whole pages of 16 would read less.
#[test]
fn partition_pages_budget_counts_their_mean_size() {
    let config = quest_config();
    let mut op =
        SaapAttention::from_index(&random_index(&config, 1, 6), 0, &Device::Cpu, DType::F32)
            .unwrap();
    let mut r = rng(12);
    let [q, k, v] = qkv(&mut r, 1, 300);
    op.prefill(&q, &k, &v, &[300]).unwrap();
    op.set_page_layout(PageLayout::PARTITIONS).unwrap();
    op.set_routing(Routing::Quest).unwrap();
    let budget = 0.3;
    op.set_keys_budget(Some(budget)).unwrap();
    // Steps that read more pages than whole pages of 16 would give.
    let mut more = 0;
    for step in 0..12 {
        let s = op.extents()[0];
        let sizes: Vec<usize> = page_lists(&op, op.extents())[0]
            .iter()
            .flatten()
            .map(Vec::len)
            .collect();
        let page_keys = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!(page_keys < QUEST_PAGE as f64 - 1.0, "{sizes:?}");
        let fixed = config.sinks + s.len + 1 - s.indexed_end;
        let allowed = (budget * (s.len + 1) as f64).floor() - fixed as f64;
        let [q, k, v] = qkv(&mut r, 1, 1);
        op.decode(&q, &k, &v).unwrap();
        assert_eq!(
            op.quest_pages(),
            (allowed / page_keys) as usize,
            "step {step}"
        );
        more += usize::from(op.quest_pages() > allowed as usize / QUEST_PAGE);
        assert_eq!(
            op.last_read().unwrap().partitions_probed,
            HKV * op.quest_pages()
        );
    }
    assert!(more >= 6, "{more} of 12 steps");
}

/// Shares over a ragged batch: an item with no page takes none (its slots hold P, its scores are
/// 0, not the NaN of a log-sum-exp over nothing); the other's shares per key sum over its pages
/// to G (each head's shares to 1).
#[test]
fn shares_route_skips_an_item_without_pages() {
    let dev = Device::Cpu;
    let mut r = rng(21);
    let p = 5;
    let means = randn(&mut r, &[2, HKV, p, DIM], 1.0);
    let q = randn(&mut r, &[2, HQ, DIM], 1.0);
    // Item 0: pages of 16, 16, 16, 7 and one empty; item 1: none.
    let one: Vec<f32> = [16.0, 16.0, 16.0, 7.0, 0.0].repeat(HKV);
    let sizes = Tensor::from_vec([one, vec![0.0; HKV * p]].concat(), (2, HKV, p), &dev).unwrap();
    let filled = sizes.gt(0f32).unwrap();
    let (probes, scores) = route_by_shares(&q, &means, &sizes, &filled, 2).unwrap();
    let probes: Vec<Vec<Vec<u32>>> = probes.to_vec3().unwrap();
    let scores: Vec<Vec<Vec<f32>>> = scores.to_vec3().unwrap();
    let n: Vec<Vec<Vec<f32>>> = sizes.to_vec3().unwrap();
    for h in 0..HKV {
        assert!(probes[0][h].iter().all(|&x| x < 4), "{probes:?}");
        assert_eq!(probes[1][h], vec![p as u32; 2]);
        assert!(scores[1][h].iter().all(|&x| x == 0.0), "{scores:?}");
        let total: f32 = scores[0][h].iter().zip(&n[0][h]).map(|(s, n)| s * n).sum();
        assert!((total - G as f32).abs() < 1e-4, "{total}");
    }
    assert!(matches!(
        route_by_shares(&q, &means, &sizes, &filled, 0),
        Err(SaapError::Config(_))
    ));
}
