//! saap — Self-Attention with Asymmetric Partitions for candle models.
pub mod config;
pub mod error;
pub mod rope;
#[cfg(feature = "models")]
pub mod models;

pub use config::{HeadLayout, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig};
pub use error::{Result, SaapError};
