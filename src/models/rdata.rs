//! Just enough of R's XDR serialization to read the character vectors of an R lazy-load
//! database (`Rdata.rdb` + `Rdata.rdx`), which is how the janeaustenr package ships the novels.

use super::{Error, Result};
use std::io::Read;

/// The R values this reader keeps; everything else it can skip is `Other`.
#[derive(Debug)]
enum RObj {
    Null,
    Symbol(String),
    Char(Option<String>),
    Strings(Vec<Option<String>>),
    Ints(Vec<i32>),
    /// A generic vector with its `names` attribute (empty if none).
    List(Vec<RObj>, Vec<String>),
    /// A pairlist: (tag, value) cells.
    Pairs(Vec<(Option<String>, RObj)>),
    Other,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    symbols: Vec<String>,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Fetch(format!("R data: {what}"))
}

impl<'a> Reader<'a> {
    /// Checks the `X\n` XDR header of a serialized value.
    fn new(data: &'a [u8]) -> Result<Self> {
        if !data.starts_with(b"X\n") {
            return Err(bad("not an XDR serialization"));
        }
        let mut r = Self {
            data,
            pos: 2,
            symbols: Vec::new(),
        };
        let version = r.int()?;
        r.int()?; // writer's R version
        r.int()?; // oldest R version that reads it
        if version == 3 {
            let n = r.len()?;
            r.bytes(n)?; // native encoding name
        } else if version != 2 {
            return Err(bad(format!("serialization version {version}")));
        }
        Ok(r)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| bad("truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.int()?;
        if n == -1 {
            // Long vector: two more words.
            let hi = self.int()? as u32 as u64;
            let lo = self.int()? as u32 as u64;
            return usize::try_from((hi << 32) | lo).map_err(|_| bad("length"));
        }
        usize::try_from(n).map_err(|_| bad(format!("length {n}")))
    }

    fn item(&mut self) -> Result<RObj> {
        let flags = self.int()?;
        let kind = flags & 0xff;
        let has_attr = flags & (1 << 9) != 0;
        let has_tag = flags & (1 << 10) != 0;
        let obj = match kind {
            // NULL, the special environments, unbound/missing markers.
            254 | 253 | 252 | 251 | 250 | 242 | 241 => return Ok(RObj::Null),
            255 => {
                let mut idx = (flags >> 8) as usize;
                if idx == 0 {
                    idx = self.len()?;
                }
                let s = self.symbols.get(idx.wrapping_sub(1));
                return Ok(RObj::Symbol(s.cloned().ok_or_else(|| bad("reference"))?));
            }
            1 => {
                let name = match self.item()? {
                    RObj::Char(s) => s.unwrap_or_default(),
                    _ => return Err(bad("symbol without name")),
                };
                self.symbols.push(name.clone());
                return Ok(RObj::Symbol(name));
            }
            2 => {
                // Pairlist cell: [attributes] [tag] car cdr; the cdr chain is flattened.
                let mut cells = Vec::new();
                let (mut attr, mut tag) = (has_attr, has_tag);
                loop {
                    if attr {
                        self.item()?;
                    }
                    let name = if tag {
                        match self.item()? {
                            RObj::Symbol(s) => Some(s),
                            _ => None,
                        }
                    } else {
                        None
                    };
                    cells.push((name, self.item()?));
                    let next = self.int()?;
                    match next & 0xff {
                        2 => {
                            attr = next & (1 << 9) != 0;
                            tag = next & (1 << 10) != 0;
                        }
                        254 => break,
                        _ => return Err(bad("pairlist tail")),
                    }
                }
                return Ok(RObj::Pairs(cells));
            }
            9 => {
                let n = self.int()?;
                if n < 0 {
                    RObj::Char(None)
                } else {
                    let b = self.bytes(n as usize)?;
                    RObj::Char(Some(String::from_utf8_lossy(b).into_owned()))
                }
            }
            10 | 13 => {
                let n = self.len()?;
                RObj::Ints((0..n).map(|_| self.int()).collect::<Result<_>>()?)
            }
            14 => {
                let n = self.len()?;
                self.bytes(n.checked_mul(8).ok_or_else(|| bad("length"))?)?;
                RObj::Other
            }
            16 => {
                let n = self.len()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    match self.item()? {
                        RObj::Char(s) => v.push(s),
                        _ => return Err(bad("string vector element")),
                    }
                }
                RObj::Strings(v)
            }
            19 | 20 => {
                let n = self.len()?;
                RObj::List(
                    (0..n).map(|_| self.item()).collect::<Result<_>>()?,
                    Vec::new(),
                )
            }
            other => return Err(bad(format!("unsupported SEXP type {other}"))),
        };
        if !has_attr {
            return Ok(obj);
        }
        let names = match self.item()? {
            RObj::Pairs(cells) => cells.into_iter().find_map(|(tag, v)| match (tag, v) {
                (Some(t), RObj::Strings(s)) if t == "names" => {
                    Some(s.into_iter().map(Option::unwrap_or_default).collect())
                }
                _ => None,
            }),
            _ => None,
        };
        Ok(match obj {
            RObj::List(items, _) => RObj::List(items, names.unwrap_or_default()),
            other => other,
        })
    }
}

/// One serialized value, gzip-compressed (`saveRDS`) or as is.
fn unserialize(bytes: &[u8]) -> Result<RObj> {
    let owned;
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("gzip: {e}")))?;
        owned = out;
        &owned[..]
    } else {
        bytes
    };
    Reader::new(data)?.item()
}

/// Every character vector of a lazy-load database, by name, as its elements (NA as empty).
pub fn read_string_vectors(rdx: &[u8], rdb: &[u8]) -> Result<Vec<(String, Vec<String>)>> {
    let RObj::List(parts, names) = unserialize(rdx)? else {
        return Err(bad("index is not a list"));
    };
    let variables = names
        .iter()
        .position(|n| n == "variables")
        .and_then(|i| parts.get(i))
        .ok_or_else(|| bad("index has no `variables`"))?;
    let RObj::List(entries, var_names) = variables else {
        return Err(bad("`variables` is not a list"));
    };
    let mut out = Vec::new();
    for (name, entry) in var_names.iter().zip(entries) {
        let RObj::Ints(pos) = entry else {
            return Err(bad(format!("bad offset of `{name}`")));
        };
        let (start, len) = match pos[..] {
            [s, l] if s >= 0 && l >= 4 => (s as usize, l as usize),
            _ => return Err(bad(format!("bad offset of `{name}`"))),
        };
        let block = rdb
            .get(start..start + len)
            .ok_or_else(|| bad(format!("`{name}` lies past the end of the database")))?;
        // 4-byte uncompressed length, then a zlib stream.
        let mut value = Vec::new();
        flate2::read::ZlibDecoder::new(&block[4..])
            .read_to_end(&mut value)
            .map_err(|e| bad(format!("`{name}`: zlib: {e}")))?;
        if let RObj::Strings(lines) = Reader::new(&value)?.item()? {
            out.push((
                name.clone(),
                lines.into_iter().map(Option::unwrap_or_default).collect(),
            ));
        }
    }
    Ok(out)
}
