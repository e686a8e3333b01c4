//! Stream capture of candle's CUDA stream into a replayable graph (`cuStreamBeginCapture` …
//! `cuGraphLaunch`).

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

/// A recorded sequence of launches on a device's stream.
pub(crate) struct Graph(CudaGraph);

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

/// Prepares `dev` for capture: candle runs everything on one stream, so cudarc's cross-stream
/// event tracking only costs host time, and a capture may not wait on events recorded before
/// it began.
pub(crate) fn prepare(dev: &CudaDevice) {
    // SAFETY: every launch of candle and of this crate goes to the device's one stream, where
    // stream order alone orders them.
    unsafe { dev.disable_event_tracking() };
}

/// Starts recording `dev`'s stream: launches are recorded, not run, until [`end`]. Only this
/// thread's calls are checked for capture-unsafe operations.
pub(crate) fn begin(dev: &CudaDevice) -> candle_core::Result<()> {
    dev.cuda_stream()
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()
}

/// Ends the recording begun by [`begin`] and instantiates it; `None` when nothing was recorded.
pub(crate) fn end(dev: &CudaDevice) -> candle_core::Result<Option<Graph>> {
    let flags = sys::CUgraphInstantiate_flags(0);
    Ok(dev.cuda_stream().end_capture(flags).w()?.map(Graph))
}

impl Graph {
    /// Enqueues the recorded launches on the stream they were recorded from.
    pub(crate) fn launch(&self) -> candle_core::Result<()> {
        self.0.launch().w()
    }
}
