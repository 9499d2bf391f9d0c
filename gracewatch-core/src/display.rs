//! Text that reaches a terminal. Process names are chosen by whoever runs
//! the process (`prctl(PR_SET_NAME)` takes any 15 bytes), and so are the
//! messages that quote them: printed raw, an ESC or CR in a name can set the
//! terminal's title, move the cursor or erase lines. Every name and message
//! shown to a terminal (`status`, `watch`, drain messages, the TUI) goes
//! through [`terminal_safe`]. JSON output does not: serde escapes control
//! characters itself.

use std::{borrow::Cow, fmt::Write as _};

/// `text` with every control character (C0, DEL, C1) and every bidi
/// override written as a visible Rust-style escape (`\x1b`, `\r`,
/// `\u{202e}`), and backslashes doubled so an escape cannot be faked.
/// Borrowed when there is nothing to escape (the usual case).
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    // Bidi embeddings, overrides and isolates reorder what follows them on
    // screen (a name could make a line read differently than it is).
    const BIDI: [char; 12] = [
        '\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}',
        '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
    ];
    c == '\\' || c.is_control() || BIDI.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_borrowed_unchanged() {
        for name in ["nginx", "python3", "gunicorn: work", "café", "名前"] {
            assert!(
                matches!(terminal_safe(name), Cow::Borrowed(n) if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn control_characters_become_visible_escapes() {
        let cases = [
            ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
            ("a\rb\nc\td", "a\\rb\\nc\\td"),
            ("\x1b[2K\x1b[1A", "\\x1b[2K\\x1b[1A"),
            ("del\x7f", "del\\x7f"),
            ("c1\u{9b}31m", "c1\\u{9b}31m"),
            ("rtl\u{202e}gnp.exe", "rtl\\u{202e}gnp.exe"),
            // A literal backslash cannot pose as an escape.
            ("x\\x1b", "x\\\\x1b"),
        ];
        for (raw, shown) in cases {
            let safe = terminal_safe(raw);
            assert_eq!(safe, shown, "{raw:?}");
            assert!(!safe.chars().any(char::is_control), "{safe:?}");
        }
    }
}
