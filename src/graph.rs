//! A whole model's decode step recorded once as a CUDA graph and replayed token after token.
//!
//! Launching a candle model's decode step costs host time for every kernel of every layer
//! (tens of microseconds per layer), which at batch 1 and small models is most of a step. A
//! [`DecodeGraph`] records the step of every layer into one CUDA graph and replays it with one
//! launch per token, so the host's cost per token no longer grows with layers and kernels.
//!
//! Plan and run: a step where no recording is valid runs as an ordinary (eager) decode step —
//! which also merges due windows into the indexes and checks for NaN — then every op is put
//! into replay ([`SaapAttention::begin_replay`]) for as many steps as all of them have room
//! for, and the next step is recorded. The following steps copy the input tokens into the
//! graph's input buffer, launch the graph and read its logits. When the room is used up, or
//! any op changed (routing, ℓ, index, sequences), the recording is dropped and the cycle
//! starts again; so it is when finished sequences leave the batch ([`DecodeGraph::retain`]).
//! Without CUDA, or where a capture fails, every step runs eagerly.

use crate::error::{ensure_finite, Result, SaapError};
use crate::{ReplayClock, SaapAttention};
use candle_core::{DType, Device, Tensor};

/// A model whose decode step a [`DecodeGraph`] can record.
pub trait GraphDecoder {
    /// The model's error type.
    type Error: From<SaapError> + From<candle_core::Error>;

    /// The model's attention ops, one per layer.
    fn attention_ops(&mut self) -> &mut [SaapAttention];

    /// Token ids must be below this (checked on the host before each step).
    fn vocab_size(&self) -> usize;

    /// Logits `[B, vocab]` (f32) of one decode step for `tokens` (`[B, 1]`, u32), appending to
    /// the caches through [`SaapAttention::decode`]. While recording it must not synchronize
    /// with the host or copy from host memory (no `to_vec`, no `Tensor::new`): every launch is
    /// recorded and replayed with the same arguments.
    ///
    /// # Errors
    /// The model's own errors.
    fn decode_logits(&mut self, tokens: &Tensor) -> std::result::Result<Tensor, Self::Error>;
}

/// Counts of how steps ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps run eagerly (planning steps, or everything without graphs).
    pub eager: usize,
    /// Graphs recorded.
    pub recordings: usize,
    /// Steps run as one graph launch.
    pub replays: usize,
}

#[cfg(feature = "cuda")]
type Graph = crate::cuda::graph::Graph;
/// Without CUDA nothing is recorded.
#[cfg(not(feature = "cuda"))]
type Graph = ();

/// A recorded decode step and what it was recorded against.
#[derive(Debug)]
struct Recording {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph: Graph,
    /// Each op's replay id at recording: any change to an op ends its replay.
    ids: Vec<Option<u64>>,
    /// Launches left.
    left: usize,
}

/// Greedy or sampled decoding of a batch with the model's whole decode step as one CUDA graph
/// (see the [module docs](self)).
///
/// ```no_run
/// # use saap::graph::{DecodeGraph, GraphDecoder};
/// # fn demo<M: GraphDecoder>(model: &mut M, device: &candle_core::Device, first: Vec<u32>)
/// #     -> Result<(), M::Error> {
/// let mut graph = DecodeGraph::new(device, first.len(), 256)?;
/// let mut next = first;
/// for _ in 0..64 {
///     let logits = graph.step(model, &next)?; // [B, vocab], f32
///     next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DecodeGraph {
    device: Device,
    /// Steps one recording is planned for, at most.
    steps: usize,
    /// Sequences decoded together (one token each per step).
    batch: usize,
    /// `[B, 1]` u32: the tokens a launch reads (allocated when a step is recorded).
    tokens: Option<Tensor>,
    /// `[B, vocab]` f32: the logits a launch writes (shaped by the first eager step).
    logits: Option<Tensor>,
    recording: Option<Recording>,
    /// Whether steps may be recorded (CUDA, and no capture has failed).
    enabled: bool,
    stats: GraphStats,
}

impl DecodeGraph {
    /// Decoding of `batch` sequences on `device`, recording a graph for up to `steps` steps at
    /// a time (fewer where an index's window merge is due sooner). On the CPU every step runs
    /// eagerly.
    ///
    /// # Errors
    /// [`SaapError::Config`] for `batch == 0` or `steps == 0`.
    pub fn new(device: &Device, batch: usize, steps: usize) -> Result<Self> {
        if batch == 0 || steps == 0 {
            return Err(SaapError::Config(format!(
                "a decode graph needs a batch and steps, got batch {batch}, steps {steps}"
            )));
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            crate::cuda::graph::prepare(dev);
        }
        Ok(Self {
            device: device.clone(),
            steps,
            batch,
            tokens: None,
            logits: None,
            recording: None,
            enabled: device.is_cuda(),
            stats: GraphStats::default(),
        })
    }

    /// Runs every step eagerly from now on (for comparisons); a recording is dropped.
    pub fn disable(&mut self) {
        self.enabled = false;
        self.recording = None;
    }

    /// Whether steps are recorded and replayed.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How the steps so far ran.
    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Sequences decoded together: the tokens each step takes.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Keeps the batch items whose `keep` flag is set in every attention op of `model` and drops
    /// the others (see [`SaapAttention::retain`]), e.g. sequences that reached their end of text;
    /// from the next step on, [`DecodeGraph::step`] takes one token per kept item. The ops leave
    /// their replay first and the recording is dropped (it was recorded for the old batch): the
    /// next step runs eagerly and records again. Keeping none leaves a batch of 0, which no step
    /// decodes. The ops are the model's per-sequence state here, as for [`GraphDecoder`].
    ///
    /// # Errors
    /// As [`SaapAttention::retain`], e.g. [`SaapError::Shape`] unless `keep` has one flag per
    /// item. The ops hold the same batch, so such an error comes from the first op, before any
    /// sequence changed.
    pub fn retain<M: GraphDecoder>(
        &mut self,
        model: &mut M,
        keep: &[bool],
    ) -> std::result::Result<(), M::Error> {
        self.recording = None;
        let ops = model.attention_ops();
        ops.iter_mut().for_each(SaapAttention::end_replay);
        for op in ops.iter_mut() {
            op.retain(keep)?;
        }
        self.batch = keep.iter().filter(|&&k| k).count();
        Ok(())
    }

    /// One decode step of `model` for `tokens` (one per batch item); returns the logits
    /// `[B, vocab]` (f32). NaN or infinity in the logits is an error (in a replayed step this
    /// is the only check: the ops' own checks need the host).
    ///
    /// # Errors
    /// [`SaapError::Shape`] unless `tokens` has one token per batch item; [`SaapError::Config`]
    /// for a token outside the vocabulary; the model's errors;
    /// [`SaapError::NonFinite`] for non-finite logits; [`SaapError::Candle`] when a launch
    /// fails.
    pub fn step<M: GraphDecoder>(
        &mut self,
        model: &mut M,
        tokens: &[u32],
    ) -> std::result::Result<Tensor, M::Error> {
        let batch = self.batch;
        if tokens.len() != batch {
            return Err(SaapError::Shape {
                name: "tokens",
                expected: format!("{batch} tokens, one per batch item"),
                got: vec![tokens.len()],
            }
            .into());
        }
        let vocab = model.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(SaapError::Config(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            ))
            .into());
        }
        let input = Tensor::from_slice(tokens, (batch, 1), &self.device)?;
        if !self.recording_valid(model) {
            return self.plan(model, &input);
        }
        self.tokens
            .as_ref()
            .expect("allocated when recorded")
            .slice_set(&input, 0, 0)?;
        self.launch(model)
    }

    /// Whether the recording may be launched again: every op is still in the replay it was
    /// recorded in, and it has steps left.
    fn recording_valid<M: GraphDecoder>(&self, model: &mut M) -> bool {
        let Some(recording) = &self.recording else {
            return false;
        };
        recording.left > 0
            && model.attention_ops().len() == recording.ids.len()
            && model
                .attention_ops()
                .iter()
                .zip(&recording.ids)
                .all(|(op, id)| op.replay_id() == *id)
    }

    /// An eager step, then (with graphs on) a recording of the next.
    fn plan<M: GraphDecoder>(
        &mut self,
        model: &mut M,
        input: &Tensor,
    ) -> std::result::Result<Tensor, M::Error> {
        self.recording = None;
        model
            .attention_ops()
            .iter_mut()
            .for_each(SaapAttention::end_replay);
        // Candle uploads small host data (a layout's dims and strides) for some kernels. A
        // capture would record copies from host memory that is gone by the replay; with this
        // cache the eager step uploads each once and the capture reuses the device copies (and
        // fails, rather than record a host copy, for anything not cached).
        #[cfg(feature = "cuda")]
        let _uploads = match &self.device {
            Device::Cuda(dev) if self.enabled => Some(dev.enable_cuda_graph_htod_cache()),
            _ => None,
        };
        let logits = model.decode_logits(input)?;
        ensure_finite("logits", &[&logits])?;
        self.stats.eager += 1;
        if self.enabled {
            self.record(model, &logits)?;
        }
        Ok(logits)
    }

    /// Puts every op into replay and records one step (nothing runs). A failed capture turns
    /// graphs off: the ops leave replay and later steps run eagerly.
    fn record<M: GraphDecoder>(
        &mut self,
        model: &mut M,
        shape_of: &Tensor,
    ) -> std::result::Result<(), M::Error> {
        // One count for every op, advanced once at the end of the recorded step.
        let clock = ReplayClock::new(self.batch, &self.device)?;
        let mut room = self.steps;
        for op in model.attention_ops().iter_mut() {
            room = room.min(op.begin_shared_replay(self.steps, &clock)?);
        }
        if room == 0 {
            // A merge is due at the next step: leave it to an eager one.
            model
                .attention_ops()
                .iter_mut()
                .for_each(SaapAttention::end_replay);
            return Ok(());
        }
        // Shaped by the batch, which retain can shrink.
        if self.logits.as_ref().map(Tensor::dims) != Some(shape_of.dims()) {
            self.logits = Some(Tensor::zeros(shape_of.dims(), DType::F32, &self.device)?);
        }
        if self.tokens.as_ref().map(Tensor::dims) != Some(&[self.batch, 1][..]) {
            self.tokens = Some(Tensor::zeros((self.batch, 1), DType::U32, &self.device)?);
        }
        let ids = model
            .attention_ops()
            .iter()
            .map(SaapAttention::replay_id)
            .collect();
        match self.capture(model, &clock) {
            Ok(recording) => {
                self.recording = recording.map(|graph| Recording {
                    graph,
                    ids,
                    left: room,
                });
                self.stats.recordings += 1;
            }
            Err(error) => {
                eprintln!("saap: CUDA graph capture failed, decoding step by step: {error}");
                self.disable();
            }
        }
        if self.recording.is_none() {
            model
                .attention_ops()
                .iter_mut()
                .for_each(SaapAttention::end_replay);
        }
        Ok(())
    }

    /// Records `model`'s decode step reading `self.tokens` and writing `self.logits`.
    #[cfg(feature = "cuda")]
    fn capture<M: GraphDecoder>(
        &self,
        model: &mut M,
        clock: &ReplayClock,
    ) -> std::result::Result<Option<Graph>, String> {
        use crate::cuda::graph;
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        let logits = self.logits.as_ref().expect("allocated before recording");
        let tokens = self.tokens.as_ref().expect("allocated before recording");
        graph::begin(dev).map_err(|e| e.to_string())?;
        let recorded = model
            .decode_logits(tokens)
            .map_err(|_| "the model's decode step failed while recording".to_string())
            .and_then(|step| {
                // Into the buffer allocated before the capture: every allocation made inside it
                // is freed inside it, so the graph owns no memory across launches.
                let step = step.reshape(logits.dims()).map_err(|e| e.to_string())?;
                logits.slice_set(&step, 0, 0).map_err(|e| e.to_string())?;
                clock.tick().map_err(|e| e.to_string())
            });
        let ended = graph::end(dev).map_err(|e| e.to_string());
        recorded?;
        ended
    }

    #[cfg(not(feature = "cuda"))]
    fn capture<M: GraphDecoder>(
        &self,
        _: &mut M,
        _: &ReplayClock,
    ) -> std::result::Result<Option<Graph>, String> {
        Ok(None)
    }

    /// Launches the recording for the tokens already in `self.tokens`.
    fn launch<M: GraphDecoder>(&mut self, model: &mut M) -> std::result::Result<Tensor, M::Error> {
        let recording = self.recording.as_mut().expect("checked valid");
        #[cfg(feature = "cuda")]
        recording.graph.launch()?;
        recording.left -= 1;
        for op in model.attention_ops().iter_mut() {
            op.replayed()?;
        }
        self.stats.replays += 1;
        let logits = self.logits.as_ref().expect("recorded").copy()?;
        ensure_finite("logits", &[&logits])?;
        Ok(logits)
    }
}
