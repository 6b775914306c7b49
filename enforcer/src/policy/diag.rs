//! Diagnostics: every configuration error carries `file:line:col` so editors and CI logs can jump
//! straight to it.

use std::fmt;
use std::ops::Range;

/// One error, positioned at the offending value (1-based line and column, columns in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
    }
}

impl std::error::Error for Diagnostic {}

/// All errors found in one load, in file order then position order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// One input text. Kept until the end of a load so byte offsets can be turned into line/col.
pub(crate) struct Source {
    pub name: String,
    pub text: String,
}

/// Collects errors as (file index, byte offset) while parsing; positions are resolved and sorted
/// only once at the end, so every check can simply push and carry on.
#[derive(Default)]
pub(crate) struct Collector {
    pub sources: Vec<Source>,
    pending: Vec<(usize, usize, String)>,
}

impl Collector {
    pub fn add_source(&mut self, name: String, text: String) -> usize {
        self.sources.push(Source { name, text });
        self.sources.len() - 1
    }

    pub fn error(&mut self, file: usize, span: Range<usize>, message: impl Into<String>) {
        self.pending.push((file, span.start, message.into()));
    }

    pub fn has_errors(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn error_count(&self) -> usize {
        self.pending.len()
    }

    /// Position of a span, for messages that point back at an earlier definition.
    pub fn locate(&self, file: usize, span: &Range<usize>) -> String {
        let src = &self.sources[file];
        let (line, col) = line_col(&src.text, span.start);
        format!("{}:{line}:{col}", src.name)
    }

    pub fn into_diagnostics(self) -> Diagnostics {
        let mut pending = self.pending;
        // Stable: messages at the same position keep the order they were found in.
        pending.sort_by_key(|(file, offset, _)| (*file, *offset));
        Diagnostics(
            pending
                .into_iter()
                .map(|(file, offset, message)| {
                    let src = &self.sources[file];
                    let (line, col) = line_col(&src.text, offset);
                    Diagnostic { file: src.name.clone(), line, col, message }
                })
                .collect(),
        )
    }
}

/// 1-based line and column (in chars) of a byte offset; offsets past the end point just after it.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbé = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, t.find('=').unwrap()), (1, 3));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(t, t.rfind('=').unwrap()), (2, 4));
        assert_eq!(line_col(t, 1000), (3, 1));
    }
}
