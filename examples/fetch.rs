//! Fetches the models and texts saap is measured on, and the font of the evaluation plots, into
//! the cache (`$SAAP_CACHE`, else `$HOME/.cache/saap`), checking their sha256.
//! `cargo run --release --example fetch -- [--qwen]` prints one `name<TAB>path` line per item;
//! `--qwen` adds the 491 MB Qwen2.5-Coder-0.5B.

use saap::models::fetch::{self, Model, Text};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let qwen = std::env::args().skip(1).any(|a| a == "--qwen");
    let mut models = vec![Model::SmolLm2_135m];
    if qwen {
        models.push(Model::Qwen25Coder05b);
    }
    for m in models {
        println!("{m:?}\t{}", fetch::model(m)?.display());
    }
    for t in Text::ALL {
        println!("{t:?}\t{}", fetch::text(t)?.display());
    }
    println!("PlotFont\t{}", fetch::font()?.display());
    Ok(())
}
