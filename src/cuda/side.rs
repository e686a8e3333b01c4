//! A second stream per device for launches of a decode step that the step's routing does not
//! wait for: the query's RoPE, the cache append (keys and values) and the new key's assignment
//! run beside the classifier and top-ℓ, and the decode kernel waits for both. In a CUDA graph
//! the fork and the join become edges, so the two branches overlap on every replay.

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

/// The side stream of each device, created once (never inside a capture: the first decode step
/// runs eagerly).
static SIDES: Mutex<Vec<(DeviceId, Arc<CudaStream>)>> = Mutex::new(Vec::new());

thread_local! {
    /// Whether this crate's launches on this thread go to the side stream ([`Side::run`]).
    static ON_SIDE: Cell<bool> = const { Cell::new(false) };
}

fn side_stream(dev: &CudaDevice) -> candle_core::Result<Arc<CudaStream>> {
    let mut sides = SIDES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = sides.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(s.clone());
    }
    let stream = dev.cuda_stream().context().new_stream().w()?;
    sides.push((dev.id(), stream.clone()));
    Ok(stream)
}

/// The stream a launch of this crate goes to: `dev`'s side stream inside [`Side::run`], else the
/// device's own (candle's) stream.
pub(crate) fn launch_stream(dev: &CudaDevice) -> candle_core::Result<Arc<CudaStream>> {
    match ON_SIDE.with(Cell::get) {
        true => side_stream(dev),
        false => Ok(dev.cuda_stream()),
    }
}

/// After a buffer was allocated or zeroed on the device's stream inside [`Side::run`]: the side
/// stream waits for that before its next launch reads the buffer.
pub(crate) fn after_main_work(dev: &CudaDevice) -> candle_core::Result<()> {
    if ON_SIDE.with(Cell::get) {
        side_stream(dev)?.join(&dev.cuda_stream()).w()?;
    }
    Ok(())
}

/// Launches forked onto the side stream, joined back into the device's stream by
/// [`Side::join`] (or, failing that, when dropped).
pub(crate) struct Side {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    joined: bool,
}

impl Side {
    /// The side stream waits for everything enqueued on `dev`'s stream so far.
    pub(crate) fn fork(dev: &CudaDevice) -> candle_core::Result<Self> {
        let stream = side_stream(dev)?;
        stream.join(&dev.cuda_stream()).w()?;
        Ok(Self {
            dev: dev.clone(),
            stream,
            joined: false,
        })
    }

    /// Runs `f` with this crate's launches going to the side stream. `f` must not launch candle
    /// ops whose results the side launches read: those stay on the device's stream.
    pub(crate) fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                ON_SIDE.with(|s| s.set(false));
            }
        }
        ON_SIDE.with(|s| s.set(true));
        let _reset = Reset;
        f()
    }

    /// The device's stream waits for the side launches.
    pub(crate) fn join(mut self) -> candle_core::Result<()> {
        self.joined = true;
        self.dev.cuda_stream().join(&self.stream).w()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if !self.joined {
            // An error left the side work unjoined: order it before later work anyway.
            let _ = self.dev.cuda_stream().join(&self.stream);
        }
    }
}
