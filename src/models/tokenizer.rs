//! Byte-level BPE tokenizers rebuilt from a GGUF file's own vocabulary and merges
//! (`tokenizer.ggml.*`), so no `tokenizer.json` is needed.

use super::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer split (GPT-4 style, single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: as Qwen2's but digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`) that are added tokens rather than BPE ones.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A `tokenizers::Tokenizer` rebuilt from GGUF metadata, with the model's special ids.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

impl GgufTokenizer {
    /// Reads the tokenizer of a GGUF file (its metadata only, not the weights).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (_, content) = super::read_gguf(path)?;
        Self::from_metadata(&content.metadata)
    }

    /// Builds the tokenizer from parsed GGUF metadata. Supports byte-level BPE (`gpt2` model)
    /// with the pre-tokenizers of SmolLM2 (`smollm`), Qwen2 (`qwen2`), Llama 3 (`llama-bpe`) and
    /// GPT-2 (`default` or none).
    pub fn from_metadata(md: &std::collections::HashMap<String, gguf_file::Value>) -> Result<Self> {
        let get = |key: &str| {
            md.get(key)
                .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata has no `{key}`")))
        };
        let model = get("tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model `{model}` is not supported (byte-level BPE `gpt2` only)"
            )));
        }
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let merges: Vec<(String, String)> = get("tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                // Byte-level symbols never contain a space (it is `Ġ`), so the first one splits.
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("malformed merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<candle_core::Result<_>>()?,
            None => Vec::new(),
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .map(|v| v.to_string().cloned())
            .transpose()?
            .unwrap_or_else(|| "default".into());
        let split = |pattern: &str| -> Result<Split> {
            Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("split regex: {e}")))
        };
        match pre.as_str() {
            "smollm" => {
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            "qwen2" => {
                tokenizer
                    .with_normalizer(Some(NFC))
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    split(QWEN2_SPLIT)?.into(),
                    ByteLevel::new(false, false, false).into(),
                ])));
            }
            "llama-bpe" => {
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    split(LLAMA3_SPLIT)?.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
            }
            "default" | "gpt2" => {
                tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "pre-tokenizer `{other}` is not supported (smollm, qwen2, llama-bpe, gpt2)"
                )))
            }
        }
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens must match whole before BPE runs, never be split.
        let added = |kind: i32| -> Vec<AddedToken> {
            types
                .iter()
                .zip(&tokens)
                .filter(|(&t, _)| t == kind)
                .map(|(_, s)| AddedToken::from(s.clone(), kind == TOKEN_TYPE_CONTROL))
                .collect()
        };
        tokenizer
            .add_special_tokens(added(TOKEN_TYPE_CONTROL))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tokenizer
            .add_tokens(added(TOKEN_TYPE_USER_DEFINED))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let id = |key: &str| -> Result<Option<u32>> {
            md.get(key)
                .map(|v| v.to_u32())
                .transpose()
                .map_err(Error::from)
        };
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .map(|v| v.to_bool())
            .transpose()?
            .unwrap_or(false);
        Ok(Self {
            tokenizer,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos,
        })
    }

    /// Token ids of `text`; special tokens written in the text become their single ids. No BOS
    /// is added (see [`GgufTokenizer::add_bos`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included as written.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token written exactly as in the vocabulary (e.g. `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Beginning-of-sequence id, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects a BOS token in front of a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
