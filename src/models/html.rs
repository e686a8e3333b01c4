//! HTML to plain text, enough for mdBook pages (the Rust Book's `print.html`).

/// The text of `html`: only the `<main>` element if there is one, scripts and styles dropped,
/// block elements on their own lines, entities decoded, runs of blank lines collapsed.
pub fn to_text(html: &str) -> String {
    let body = match (html.find("<main"), html.rfind("</main>")) {
        (Some(a), Some(b)) if a < b => &html[a..b],
        _ => html,
    };
    let mut out = String::with_capacity(body.len() / 2);
    let mut rest = body;
    while let Some(lt) = rest.find('<') {
        out.push_str(&decode_entities(&rest[..lt]));
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            rest = "";
            break;
        };
        let tag = rest[1..gt].trim_start_matches('/').to_ascii_lowercase();
        let name: String = tag
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        rest = &rest[gt + 1..];
        if name == "script" || name == "style" {
            let close = format!("</{name}>");
            rest = rest.find(&close).map_or("", |i| &rest[i + close.len()..]);
            continue;
        }
        let block = matches!(
            name.as_str(),
            "p" | "div"
                | "br"
                | "li"
                | "pre"
                | "tr"
                | "h1"
                | "h2"
                | "h3"
                | "h4"
                | "h5"
                | "h6"
                | "blockquote"
                | "section"
                | "table"
                | "ul"
                | "ol"
                | "hr"
        );
        if block && !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out.push_str(&decode_entities(rest));
    let mut text = String::with_capacity(out.len());
    let mut blank = 0;
    for line in out.lines() {
        let line = line.trim_end();
        blank = if line.is_empty() { blank + 1 } else { 0 };
        if blank <= 1 {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.trim().to_string() + "\n"
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').filter(|&i| i <= 10).and_then(|semi| {
            let ent = &rest[1..semi];
            let c = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                    u32::from_str_radix(&ent[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::to_text;

    #[test]
    fn strips_tags_scripts_and_entities() {
        let html = "<html><nav>menu</nav><main><h1>Title</h1><p>a &lt;b&gt; &amp; &#39;c&#x27;</p>\
                    <script>var x = 1;</script><pre><code>fn main() {}\n</code></pre></main></html>";
        assert_eq!(to_text(html), "Title\na <b> & 'c'\nfn main() {}\n");
    }
}
