#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod attend;
pub mod attention;
pub mod budget;
pub mod classify;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod elem;
pub mod error;
pub mod graph;
pub mod index;
#[cfg(feature = "models")]
pub mod models;
pub mod partition;
pub mod quest;
pub mod rope;
pub mod train;

pub use attention::{ReadStats, Recorded, Recorder, ReplayClock, SaapAttention};
pub use config::{
    HeadLayout, PageLayout, PageScore, RopeConfig, RopeKind, RopeScaling, Routing, SaapConfig,
};
pub use error::{Result, SaapError};
pub use index::{LayerIndex, SaapIndex};
