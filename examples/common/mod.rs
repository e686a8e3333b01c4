//! What the command-line examples share: which model to run, on which device, loading it, and
//! reporting errors to people.

use candle_core::Device;
use saap::models::fetch;
use saap::models::{GgufTokenizer, Llama};
use saap::{PageLayout, PageScore, Routing};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Result of the examples' `run` functions.
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Prints an error with its `Display` message (and its causes), one line each, and turns it into
/// the process exit code.
pub fn exit_code(result: Res<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", without_backtrace(&e.to_string()));
            let mut source = e.source();
            while let Some(cause) = source {
                // thiserror's `transparent` and `{source}` variants repeat their cause's message.
                if !e.to_string().contains(&cause.to_string()) {
                    eprintln!("  caused by: {}", without_backtrace(&cause.to_string()));
                }
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// A message without the backtrace candle appends to its errors when `RUST_BACKTRACE` is set
/// (lines from `   0: ` on): people get the message, not the stack.
fn without_backtrace(message: &str) -> &str {
    message
        .find("\n   0: ")
        .map_or(message, |at| &message[..at])
        .trim_end()
}

/// `--page-score`'s value: what Quest's pages keep and rank by (`bound`: min and max, Quest's
/// own; `mean`: the mean key, the group's best head; `shares`: the mean key, the group's summed
/// estimated shares).
#[allow(dead_code)] // not every example routes by Quest
pub fn parse_page_score(value: &str) -> Result<PageScore, String> {
    match value {
        "bound" => Ok(PageScore::Bound),
        "mean" => Ok(PageScore::Mean),
        "shares" => Ok(PageScore::Shares),
        _ => Err(format!(
            "{value:?} is not a page score (bound, mean or shares)"
        )),
    }
}

/// `--page-score`'s value as the option takes it.
#[allow(dead_code)] // not every example routes by Quest
pub fn page_score_arg(score: PageScore) -> &'static str {
    match score {
        PageScore::Bound => "bound",
        PageScore::Mean => "mean",
        PageScore::Shares => "shares",
    }
}

/// `--page-layout`'s value: how Quest's pages cut the indexed keys (`consecutive`, Quest's own;
/// `partitions`, each partition's list of the index in pages of 16; `partitions:N`, in pages of
/// N keys).
#[allow(dead_code)] // not every example routes by Quest
pub fn parse_page_layout(value: &str) -> Result<PageLayout, String> {
    let bad = || {
        format!(
            "{value:?} is not a page layout (consecutive, partitions or partitions:N with N in \
             1..={})",
            saap::config::QUEST_PAGE
        )
    };
    match value.split_once(':') {
        None if value == "consecutive" => Ok(PageLayout::Consecutive),
        None if value == "partitions" => Ok(PageLayout::PARTITIONS),
        Some(("partitions", page)) => match page.parse() {
            Ok(page) if (1..=saap::config::QUEST_PAGE).contains(&page) => {
                Ok(PageLayout::Partitions { page })
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// Quest's pages in words: how they cut the keys and what ranks them.
#[allow(dead_code)] // not every example routes by Quest
pub fn describe_pages(layout: PageLayout, score: PageScore) -> String {
    let pages = match layout {
        PageLayout::Consecutive => "pages of 16 consecutive keys".to_string(),
        PageLayout::Partitions { page } => format!("pages of {page} keys within each partition"),
    };
    let by = match score {
        PageScore::Bound => "their min/max bound",
        PageScore::Mean => "their mean key",
        PageScore::Shares => "the group's summed shares by their mean key",
    };
    format!("{pages}, ranked by {by}")
}

/// `--page-layout`'s value as the option takes it.
#[allow(dead_code)] // not every example routes by Quest
pub fn page_layout_arg(layout: PageLayout) -> String {
    match layout {
        PageLayout::Consecutive => "consecutive".into(),
        PageLayout::Partitions { page } => format!("partitions:{page}"),
    }
}

/// A list of layers given with `flag`: every layer must exist in a model of `n_layers`.
#[allow(dead_code)] // not every example takes layers
pub fn check_layers(flag: &str, layers: &[usize], n_layers: usize) -> Res<()> {
    match layers.iter().find(|&&l| l >= n_layers) {
        Some(layer) => {
            Err(format!("{flag}: layer {layer} out of range (the model has {n_layers})").into())
        }
        None => Ok(()),
    }
}

/// Sets the window the next prefill keeps so that every layer can then shrink to the one asked
/// for it: the widest of `asked` and the index's (`index_window`); with none asked for, the ops
/// keep theirs.
#[allow(dead_code)] // not every example takes windows
pub fn keep_widest_window(
    model: &mut Llama,
    asked: impl IntoIterator<Item = usize>,
    index_window: usize,
) -> Res<()> {
    if let Some(widest) = asked.into_iter().max() {
        model.set_window(widest.max(index_window))?;
    }
    Ok(())
}

/// Gives each layer its recent window by its routing: the layers routed by Quest `quest_window`
/// (default `window`), the others `window` (default the index's, `index_window`); with neither
/// asked for, the ops keep theirs. A window holding tokens can only shrink, so the prefill
/// before keeps the widest ([`keep_widest_window`]).
#[allow(dead_code)] // not every example takes windows
pub fn set_layer_windows(
    model: &mut Llama,
    window: Option<usize>,
    quest_window: Option<usize>,
    index_window: usize,
) -> Res<()> {
    if window.is_none() && quest_window.is_none() {
        return Ok(());
    }
    let plain = window.unwrap_or(index_window);
    let quest = quest_window.unwrap_or(plain);
    for layer in 0..model.n_layers() {
        let op = model.attention_mut(layer)?;
        let window = match op.routing() {
            Routing::Quest => quest,
            _ => plain,
        };
        op.set_window(window)?;
    }
    Ok(())
}

/// Fixes candle's CPU thread count once. Without `RAYON_NUM_THREADS`, candle works it out again
/// on every CPU matmul, which on Linux parses `/proc/cpuinfo`: `perf` put about 5% of a
/// SmolLM2 decode step's samples there. Sets the variable, when unset, to the value candle would
/// compute (physical cores); call first thing in `main`, before any thread starts.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The model options of every tool (flattened into each tool's own options).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// GGUF checkpoint (llama or qwen2); default SmolLM2-135M, fetched on demand
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Use Qwen2.5-Coder-0.5B-Instruct (fetched on demand, 491 MB)
    #[arg(long)]
    pub qwen: bool,
    /// YaRN RoPE scaling by F over the model's context (e.g. 4: Qwen2.5 at 128k); an index must
    /// have been calibrated with the same --yarn
    #[arg(long)]
    pub yarn: Option<f64>,
    /// Run on GPU 0 (build with --features cuda)
    #[arg(long)]
    pub cuda: bool,
}

/// A model ready to run, with its tokenizer.
pub struct Loaded {
    pub device: Device,
    /// File stem of the checkpoint: names cached indexes and reports.
    pub name: String,
    /// The checkpoint file.
    #[allow(dead_code)] // not every example needs it
    pub path: PathBuf,
    pub tok: GgufTokenizer,
    pub model: Llama,
}

impl ModelArgs {
    /// Fetches the model if it is not cached, loads it on the chosen device and applies YaRN.
    pub fn load(&self) -> Res<Loaded> {
        let device = if self.cuda {
            Device::new_cuda(0).map_err(|e| {
                format!("--cuda: no usable GPU 0 ({e}); build with `--features cuda` and check the driver")
            })?
        } else {
            Device::Cpu
        };
        let path = fetch::model_or_default(self.model.as_deref(), self.qwen)?;
        let name = path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        // The weights first: a file that is not a checkpoint is reported as such, not as a
        // tokenizer problem.
        let mut model = Llama::from_gguf_auto(&path, &device)?;
        let tok = GgufTokenizer::from_gguf(&path)?;
        if let Some(factor) = self.yarn {
            model.set_yarn(factor)?;
        }
        Ok(Loaded {
            device,
            name,
            path,
            tok,
            model,
        })
    }
}

/// Progress of a long loop on stderr: one line updated in place on a terminal, plain lines (at
/// most one per `every` of the total) in logs.
#[allow(dead_code)] // not every example reports progress
pub struct Progress {
    what: String,
    total: usize,
    start: Instant,
    terminal: bool,
    next_line: usize,
    every: usize,
}

#[allow(dead_code)]
impl Progress {
    pub fn new(what: &str, total: usize) -> Self {
        Self {
            what: what.into(),
            total,
            start: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            next_line: 0,
            every: total.div_ceil(8).max(1),
        }
    }

    /// Reports `done` of the total (clamped to it).
    pub fn set(&mut self, done: usize) {
        let done = done.min(self.total);
        let secs = self.start.elapsed().as_secs_f64();
        let line = format!("{} {done}/{} ({secs:.0} s)", self.what, self.total);
        if self.terminal {
            eprint!("\r{line}   ");
            if done == self.total {
                eprintln!();
            }
        } else if done >= self.next_line || done == self.total {
            eprintln!("{line}");
            self.next_line = done + self.every;
        }
    }
}
