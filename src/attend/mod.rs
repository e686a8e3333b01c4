//! Attention itself: the decode kernel over id lists (sparse: sinks ∪ probed partitions ∪ window;
//! dense: every position), and the chunked causal attention of prefill.

pub mod decode;
pub mod prefill;

pub use decode::{DecodeOp, Partitions, SeqExtent};
pub use prefill::{prefill_attention, PrefillOp};
