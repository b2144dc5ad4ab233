//! A linear pre-scan that refuses deeply nested YAML before the YAML parser
//! sees it.
//!
//! Contract: [`check`] reads the text once (O(bytes), no allocation beyond the
//! indentation stack) and returns [`TooDeep`] when flow collections (`[`, `{`)
//! plus block levels (indentation steps and `- `/`? ` entries) nest deeper than
//! the limit. libyaml, under serde_norway, rescans every open flow level on each
//! token, so `[[[[…` costs time quadratic in the depth (400 KB took minutes);
//! refusing it here costs microseconds.
//!
//! It is a tokenizer sketch, not a YAML parser: it knows comments, quoted
//! scalars (where they can start), block scalars (`|`, `>`) and plain
//! multi-line continuations well enough that brackets inside strings and
//! comments are not counted in any file written for Keyway. It errs toward
//! counting (a string full of `[` inside a multi-line plain scalar of an odd
//! shape might be refused) rather than toward missing nesting. Whatever a
//! crafted file could still slip past it costs only that file's own parse,
//! which runs off the control loop (see `scanner`).

/// Deepest nesting local mode parses.
pub const MAX_NESTING: usize = 64;

/// Where the limit was crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooDeep {
    /// 1-based line.
    pub line: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Single,
    Double,
}

/// Checks that `text` nests at most `limit` levels.
pub fn check(text: &str, limit: usize) -> Result<(), TooDeep> {
    Scan {
        b: text.as_bytes(),
        i: 0,
        line: 1,
        limit,
        flow: 0,
        indents: Vec::new(),
    }
    .run()
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    line: usize,
    limit: usize,
    /// Open flow collections.
    flow: usize,
    /// Columns of open block nodes, increasing.
    indents: Vec<usize>,
}

impl Scan<'_> {
    fn at(&self, i: usize) -> u8 {
        self.b.get(i).copied().unwrap_or(b'\n')
    }

    fn depth_ok(&self) -> Result<(), TooDeep> {
        if self.indents.len() + self.flow > self.limit {
            Err(TooDeep { line: self.line })
        } else {
            Ok(())
        }
    }

    fn blank_or_end(&self, i: usize) -> bool {
        matches!(self.at(i), b' ' | b'\t' | b'\r' | b'\n')
    }

    /// Skips to the end of the line (not past the newline).
    fn skip_line(&mut self) {
        while self.i < self.b.len() && self.b[self.i] != b'\n' {
            self.i += 1;
        }
    }

    /// Skips a quoted scalar whose opening quote is at `self.i`; it may span
    /// lines. Leaves `self.i` after the closing quote.
    fn skip_quoted(&mut self, q: Quote) {
        self.i += 1;
        while self.i < self.b.len() {
            let c = self.b[self.i];
            match (q, c) {
                (_, b'\n') => self.line += 1,
                (Quote::Double, b'\\') => self.i += 1,
                (Quote::Double, b'"') => {
                    self.i += 1;
                    return;
                }
                (Quote::Single, b'\'') if self.at(self.i + 1) == b'\'' => self.i += 1,
                (Quote::Single, b'\'') => {
                    self.i += 1;
                    return;
                }
                _ => {}
            }
            self.i += 1;
        }
    }

    fn run(mut self) -> Result<(), TooDeep> {
        // Column the content lines of a block scalar must exceed.
        let mut block_scalar: Option<usize> = None;
        // A block plain scalar ended the previous line: lines indented past
        // this column continue it (so a quote there is text, not a string).
        let mut plain_parent: Option<usize> = None;
        while self.i < self.b.len() {
            // Start of a line in block context.
            let start = self.i;
            while matches!(self.at(self.i), b' ' | b'\t') {
                self.i += 1;
            }
            let indent = self.i - start;
            let c = self.at(self.i);
            if matches!(c, b'\n' | b'\r') {
                self.next_line();
                continue;
            }
            if let Some(col) = block_scalar {
                if indent > col {
                    self.skip_line();
                    self.next_line();
                    continue;
                }
                block_scalar = None;
            }
            if let Some(col) = plain_parent.take()
                && indent > col
                && c != b'#'
            {
                // Continuation text; a ` #` ends it (and the scalar).
                let mut comment = false;
                while self.i < self.b.len() && self.b[self.i] != b'\n' {
                    if self.b[self.i] == b'#' && self.blank_or_end(self.i.saturating_sub(1)) {
                        comment = true;
                    }
                    self.i += 1;
                }
                if !comment {
                    plain_parent = Some(col);
                }
                self.next_line();
                continue;
            }
            if c == b'#' {
                self.skip_line();
                self.next_line();
                continue;
            }
            if indent == 0
                && (self.b[self.i..].starts_with(b"---") || self.b[self.i..].starts_with(b"..."))
                && self.blank_or_end(self.i + 3)
            {
                self.indents.clear();
                self.i += 3;
                self.tokens(0, &mut block_scalar, &mut plain_parent)?;
                continue;
            }
            while self.indents.last().is_some_and(|&top| top >= indent) {
                self.indents.pop();
            }
            self.indents.push(indent);
            self.depth_ok()?;
            self.tokens(indent, &mut block_scalar, &mut plain_parent)?;
        }
        Ok(())
    }

    fn next_line(&mut self) {
        if self.i < self.b.len() {
            self.i += 1;
            self.line += 1;
        }
    }

    /// Scans the tokens of one block-context line whose indentation is
    /// `indent`, and of every line a flow collection opened on it spans.
    /// Leaves `self.i` at the start of the next line.
    fn tokens(
        &mut self,
        indent: usize,
        block_scalar: &mut Option<usize>,
        plain_parent: &mut Option<usize>,
    ) -> Result<(), TooDeep> {
        let line_start = self.i - indent.min(self.i);
        // Column of the node a block scalar or a plain continuation belongs
        // to: the line's, a `- ` entry's, or the key's of a `key:`.
        let mut parent_col = indent;
        let mut at_start = true;
        let mut after_quoted = false;
        let mut plain_value = false;
        while self.i < self.b.len() {
            let c = self.b[self.i];
            let block = self.flow == 0;
            if c == b'\n' {
                if block {
                    if plain_value {
                        *plain_parent = Some(parent_col);
                    }
                    self.next_line();
                    return Ok(());
                }
                self.line += 1;
                self.i += 1;
                continue;
            }
            if matches!(c, b' ' | b'\t' | b'\r') {
                self.i += 1;
                continue;
            }
            if c == b'#' && (self.i == 0 || self.blank_or_end(self.i - 1)) {
                self.skip_line();
                plain_value = false;
                continue;
            }
            if at_start {
                match c {
                    b'"' | b'\'' => {
                        self.skip_quoted(if c == b'"' {
                            Quote::Double
                        } else {
                            Quote::Single
                        });
                        at_start = false;
                        after_quoted = true;
                        plain_value = false;
                    }
                    b'[' | b'{' => {
                        self.flow += 1;
                        self.depth_ok()?;
                        self.i += 1;
                    }
                    b']' | b'}' if !block => {
                        // Empty collection or trailing comma.
                        self.close_flow();
                        at_start = false;
                        after_quoted = false;
                    }
                    b',' | b':' if !block => self.i += 1,
                    b'|' | b'>' if block => {
                        *block_scalar = Some(parent_col);
                        self.skip_line();
                    }
                    b'-' | b'?' | b':' if block && self.blank_or_end(self.i + 1) => {
                        // A block entry: the node after it is one level deeper.
                        if c != b':' {
                            parent_col = self.i - line_start;
                        }
                        self.i += 1;
                        let mut j = self.i;
                        while matches!(self.at(j), b' ' | b'\t') {
                            j += 1;
                        }
                        if c != b':' && !matches!(self.at(j), b'\n' | b'\r' | b'#') {
                            self.indents.push(j - line_start);
                            self.depth_ok()?;
                        }
                    }
                    b'&' | b'!' => {
                        // Anchor or tag: the node itself comes next.
                        while !self.blank_or_end(self.i)
                            && (block || !is_flow_indicator(self.at(self.i)))
                        {
                            self.i += 1;
                        }
                    }
                    _ => {
                        at_start = false;
                        after_quoted = false;
                        plain_value = block;
                        self.i += 1;
                    }
                }
                continue;
            }
            // Inside or right after a scalar.
            match c {
                b':' if self.blank_or_end(self.i + 1)
                    || (!block && (after_quoted || is_flow_indicator(self.at(self.i + 1)))) =>
                {
                    // What came before was a key; its value starts next.
                    if block {
                        parent_col = self.indents.last().copied().unwrap_or(indent);
                    }
                    at_start = true;
                    plain_value = false;
                }
                b',' if !block => at_start = true,
                b'[' | b'{' if !block => {
                    self.flow += 1;
                    self.depth_ok()?;
                    at_start = true;
                }
                b']' | b'}' if !block => {
                    self.flow -= 1;
                }
                _ => {}
            }
            after_quoted = false;
            self.i += 1;
        }
        Ok(())
    }

    fn close_flow(&mut self) {
        self.flow = self.flow.saturating_sub(1);
        self.i += 1;
    }
}

fn is_flow_indicator(c: u8) -> bool {
    matches!(c, b',' | b'[' | b']' | b'{' | b'}')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ok(t: &str) {
        assert_eq!(check(t, MAX_NESTING), Ok(()), "refused:\n{t}");
    }

    fn deep(t: &str) -> TooDeep {
        check(t, MAX_NESTING).unwrap_err()
    }

    #[test]
    fn flow_nesting_is_counted() {
        let n = 200_000;
        let t = format!("a: {}{}", "[".repeat(n), "]".repeat(n));
        let start = std::time::Instant::now();
        assert_eq!(deep(&t).line, 1);
        eprintln!("{} bytes refused in {:?}", t.len(), start.elapsed());
        ok(&format!("a: {}{}", "[".repeat(63), "]".repeat(63)));
        deep(&format!("a: {}", "{x: ".repeat(65)));
        deep(&format!("- {}", "[{".repeat(40)));
        // Spread over lines, flow context keeps counting.
        deep(&format!("a:\n{}", "  [\n".repeat(70)));
    }

    #[test]
    fn block_nesting_is_counted() {
        deep(&format!("{}x", "- ".repeat(70)));
        let mut t = String::new();
        for d in 0..70 {
            t.push_str(&format!("{}k{d}:\n", "  ".repeat(d)));
        }
        deep(&t);
        let mut t = String::new();
        for d in 0..30 {
            t.push_str(&format!("{}k{d}:\n", "  ".repeat(d)));
        }
        ok(&t);
    }

    #[test]
    fn strings_comments_and_block_scalars_are_not_nesting() {
        let b = "[".repeat(100);
        ok(&format!(
            "a: \"{b}\"\nb: '{b}'\nc: 'it''s {b}'\nd: \"esc \\\" {b}\"\n"
        ));
        ok(&format!("# {b}\na: 1 # {b}\n"));
        ok(&format!("a: |\n  {b}\n  more {b}\nb: >-\n  {b}\n"));
        ok(&format!("- k: |\n    {b}\n  j: 1\n"));
        ok(&format!("a: plain {b} text\n"));
        ok(&format!("a: \"multi\n  line {b}\n  \"\n"));
        ok(&format!("a: [\"{b}\", '{b}', x {b}]\n").replace(&format!("x {b}"), "x"));
        ok(&format!("a: [&x '{b}', !t \"{b}\"]\n"));
        ok("target: {address: \"[::1]:22\"}\nurl: [http://x:80/a]\n");
    }

    #[test]
    fn a_quote_inside_plain_text_hides_nothing() {
        let n = 100;
        let nested = format!("{}{}", "[".repeat(n), "]".repeat(n));
        // `x 'y` is plain text; the quote opens no string.
        deep(&format!("a: x 'y\nb: {nested}\nc: '\n"));
        // A quoted-looking continuation line of a plain scalar is text too.
        deep(&format!("a: x\n  'y\nb: {nested}\nc: '\n"));
        // In flow context, a quote after plain text is text.
        deep(&format!("a: [x 'y, {nested}, ']\n"));
        // A block scalar ends where the indentation does.
        deep(&format!("- k: |\n    text\n  j: {nested}\n"));
    }

    #[test]
    fn real_files_pass() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut seen = 0;
        for dir in ["examples/local", "manifests", "crds", "charts/keyway"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                    let t = std::fs::read_to_string(&p).unwrap();
                    assert_eq!(check(&t, MAX_NESTING), Ok(()), "{}", p.display());
                    seen += 1;
                }
            }
        }
        assert!(seen > 0);
    }
}
