//! CUDA backend: the kernels of `cuda/*.cu` (compiled to fatbins by `build.rs`, embedded here) and
//! their launches for [`crate::attend::DecodeOp`], [`crate::attend::PrefillOp`] and [`crate::partition::scan::MergeOp`].
//! Modules are loaded once per device and kept in [`MODULES`].

mod append;
mod decode;
#[cfg(feature = "models")]
pub(crate) mod glue;
pub(crate) mod graph;
mod merge;
mod prefill;
pub(crate) mod quest;
pub(crate) mod route;
mod side;

pub(crate) use append::{assign, kv_write, rope_new, rope_write};
pub(crate) use decode::decode;
pub(crate) use merge::{merge, summary_means, summary_sums};
pub(crate) use prefill::prefill;
pub(crate) use side::Side;
use side::{after_main_work, launch_stream};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// Batch items per launch; must match `SAAP_MAX_BATCH` in `cuda/common.cuh`.
const MAX_BATCH: usize = 64;

/// Two u32 per batch item, passed by value to a kernel (`ItemTable` in `cuda/common.cuh`): no
/// host-to-device copy, and a CUDA graph captures it with the launch.
#[repr(C)]
#[derive(Clone, Copy)]
struct ItemTable {
    a: [u32; MAX_BATCH],
    b: [u32; MAX_BATCH],
}

// SAFETY: plain old data with the layout of the C struct.
unsafe impl DeviceRepr for ItemTable {}

impl ItemTable {
    /// Table of up to `MAX_BATCH` pairs; checks that each value fits in u32.
    fn new(pairs: impl Iterator<Item = (usize, usize)>) -> candle_core::Result<Self> {
        let mut table = Self {
            a: [0; MAX_BATCH],
            b: [0; MAX_BATCH],
        };
        for (i, (a, b)) in pairs.enumerate().take(MAX_BATCH) {
            table.a[i] = to_u32(a)?;
            table.b[i] = to_u32(b)?;
        }
        Ok(table)
    }
}

/// The kernels' name of an element type (`f32`, `bf16`, `f16`); `what` names the caller in the
/// error for any other type.
fn dtype_name(dtype: DType, what: &str) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("saap cuda {what}: dtype {other:?} (f32, bf16 or f16)"),
    })
}

/// Kernel sizes are u32 on the device.
fn to_u32(x: usize) -> candle_core::Result<u32> {
    u32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("saap cuda: {x} exceeds u32")))
}

/// One kernel source as `build.rs` compiled it: SASS for the build's compute capability plus PTX.
struct Module {
    name: &'static str,
    fatbin: &'static [u8],
}

const DECODE: Module = Module {
    name: "saap_decode",
    fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/decode.fatbin")),
};

const APPEND: Module = Module {
    name: "saap_append",
    fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/append.fatbin")),
};

const PREFILL: Module = Module {
    name: "saap_prefill",
    fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/prefill.fatbin")),
};

const QUEST: Module = Module {
    name: "saap_quest",
    fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/quest.fatbin")),
};

const MERGE: Module = Module {
    name: "saap_merge",
    fatbin: include_bytes!(concat!(env!("OUT_DIR"), "/merge.fatbin")),
};

/// Modules loaded so far, per device: loading one is slow (a JIT where the fatbin has no SASS
/// for the GPU), getting a function from a loaded one is not.
static MODULES: Mutex<Vec<(DeviceId, &'static str, Arc<CudaModule>)>> = Mutex::new(Vec::new());

/// Loads `function` of `module` on `dev` (the module once per device).
fn load(dev: &CudaDevice, module: &Module, function: &str) -> candle_core::Result<CudaFunction> {
    let context = dev.cuda_stream().context().clone();
    let (major, minor) = context.compute_capability().w()?;
    if major < 8 {
        candle_core::bail!(
            "saap cuda: compute capability {major}.{minor} is too old; the kernels need 8.0+"
        )
    }
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    let id = dev.id();
    let loaded = match modules
        .iter()
        .find(|(d, name, _)| *d == id && *name == module.name)
    {
        Some((_, _, loaded)) => loaded.clone(),
        None => {
            // An owned copy: the driver wants the image 8-byte aligned, which `include_bytes!`
            // does not promise and the allocator does.
            let image = Ptx::from_binary(module.fatbin.to_vec());
            let loaded = context.load_module(image).w()?;
            modules.push((id, module.name, loaded.clone()));
            loaded
        }
    };
    drop(modules);
    loaded.load_function(function).w()
}

/// Shared memory a block may use without opting in.
const SMEM_LIMIT: usize = 48 * 1024;

/// The most dynamic shared memory a block of `dev` may opt in to.
fn smem_optin(dev: &CudaDevice) -> usize {
    dev.cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(SMEM_LIMIT, |n| usize::try_from(n).unwrap_or(0))
}

/// Lets `func` launch with `bytes` of dynamic shared memory per block: above the default 48 KiB
/// it opts in (per function, idempotent), up to the device's limit.
///
/// # Errors
/// `what` names the kernel in the error when `bytes` exceeds what the device allows.
fn use_smem(
    dev: &CudaDevice,
    func: &CudaFunction,
    bytes: usize,
    what: &str,
) -> candle_core::Result<()> {
    if bytes <= SMEM_LIMIT {
        return Ok(());
    }
    let limit = smem_optin(dev);
    if bytes > limit {
        candle_core::bail!("saap cuda {what}: {bytes} bytes of shared memory per block exceed the device's {limit}");
    }
    dev.cuda_stream().context().bind_to_thread().w()?;
    func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        i32::try_from(bytes).map_err(|_| {
            candle_core::Error::Msg(format!("saap cuda {what}: {bytes} bytes of shared memory"))
        })?,
    )
    .w()?;
    Ok(())
}

/// Number of streaming multiprocessors of the device.
fn sm_count(dev: &CudaDevice) -> candle_core::Result<usize> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(n.max(1) as usize)
}

/// The contiguous view of a storage that a layout addresses.
fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "saap cuda" })?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// Runs `f` on the CUDA storage and layout of a tensor the op holds.
fn with_cuda<R>(
    tensor: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s, layout),
        _ => candle_core::bail!("saap cuda: {what} is not on a CUDA device"),
    }
}

/// A null device pointer: the `advance` argument of a launch outside replay.
static NULL_PTR: u64 = 0;

/// Runs `f` with a view of the replayed-step counts `advance` (`[B]` u32, see `replayed_steps`
/// in `cuda/common.cuh`), or with `None` outside replay.
fn with_advance<R>(
    advance: Option<&Tensor>,
    f: impl FnOnce(Option<&CudaView<'_, u32>>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match advance {
        None => f(None),
        Some(t) => with_cuda(t, "replayed steps", |st, l| f(Some(&view::<u32>(st, l)?))),
    }
}

/// The `advance` argument of a launch for items `i0..i0 + items`.
fn advance_chunk<'a>(
    advance: Option<&CudaView<'a, u32>>,
    i0: usize,
    items: usize,
) -> Option<CudaView<'a, u32>> {
    advance.map(|a| a.slice(i0..i0 + items))
}

/// Pushes a launch's `advance` argument: the counts of its items, or a null pointer outside
/// replay.
fn push_advance<'a>(launch: &mut LaunchArgs<'a>, advance: &'a Option<CudaView<'_, u32>>) {
    match advance {
        Some(counts) => launch.arg(counts),
        None => launch.arg(&NULL_PTR),
    };
}

/// One replayed decode step is over: every item's count moves on by one (`saap_advance`).
pub(crate) fn advance_replay(counts: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "saap advance" })?;
    let dev = counts.device.clone();
    let mut counts = counts.as_cuda_slice_mut::<u32>()?.slice_mut(start..end);
    let items = to_u32(end - start)?;
    let func = load(&dev, &APPEND, "saap_advance")?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&mut counts).arg(&items);
    let cfg = LaunchConfig {
        grid_dim: (items.div_ceil(256).max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `saap_advance`; `items` counts are written.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// Device buffers that kernels leave all-zero after each launch (split counters, assignment
/// scratch), one per device, allocated zeroed once and grown on demand. Launches on one device
/// run in stream order, so they can share it. A grown buffer's old allocation is kept, not freed:
/// a captured CUDA graph may still point at it.
pub(crate) struct ZeroedBuffers<T>(Mutex<Vec<(DeviceId, CudaSlice<T>)>>);

impl<T: DeviceRepr + ValidAsZeroBits> ZeroedBuffers<T> {
    pub(crate) const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    /// Runs `f` with `dev`'s buffer of at least `len` elements (the lock held meanwhile).
    pub(crate) fn with<R>(
        &self,
        dev: &CudaDevice,
        len: usize,
        f: impl FnOnce(&mut CudaSlice<T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let id = dev.id();
        // The newest buffer of a device is its largest (doubling keeps the retired ones few).
        let largest = all
            .iter()
            .rev()
            .find(|(d, _)| *d == id)
            .map_or(0, |(_, b)| b.len());
        if largest < len {
            let buf = dev.alloc_zeros::<T>(len.max(2 * largest).max(1024))?;
            all.push((id, buf));
            after_main_work(dev)?;
        }
        let (_, buf) = all
            .iter_mut()
            .rev()
            .find(|(d, _)| *d == id)
            .expect("inserted above");
        f(buf)
    }
}
