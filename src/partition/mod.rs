//! Key partitions: k-means centroids, nearest-centroid assignment, the partition-scan that
//! groups token ids by partition (`perm`, `offsets`), and per-partition summaries (sums and means
//! of the indexed keys and values).
//!
//! Per (batch item, KV head) the index lives in one u32 row, its *directory*:
//! `[offsets[0..=C], perm[0..capacity]]`, where `perm[offsets[c]..offsets[c+1]]` are the token
//! positions of partition `c` in increasing order. Keeping both in one tensor lets a single
//! in-place op update them together on either backend.

pub mod assign;
pub mod kmeans;
pub mod scan;
pub(crate) mod summary;
