//! Names a client chose (keys, any bytes) quoted to people: in `distcore
//! inspect`'s output, error messages and log lines. A key may hold terminal
//! escape sequences, carriage returns or newlines that would retitle or
//! clear the reader's terminal or forge lines of output; shown through
//! [`printable`], it cannot.

/// `bytes` as text safe to print: valid UTF-8 as it is, except control
/// characters (C0, DEL, C1) and the bidirectional-text controls, which are
/// written `\n`, `\r`, `\t` or `\u{NN}`; bytes that are not UTF-8 as
/// `\xNN`. An ordinary key prints unchanged.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() || is_bidi_control(c) => {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32));
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Characters that reorder the text around them when displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn ordinary_keys_print_unchanged_and_controls_never_reach_the_terminal() {
        assert_eq!(printable(b"init/rank 3"), "init/rank 3");
        assert_eq!(printable("ключ/é".as_bytes()), "ключ/é");
        assert_eq!(
            printable(b"\x1b]0;owned\x07\x1b[2J\rfake\nline\t"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\rfake\\nline\\t"
        );
        assert_eq!(
            printable("a\u{202e}b\u{85}".as_bytes()),
            "a\\u{202e}b\\u{85}"
        );
        assert_eq!(printable(b"bad\xff\xc3"), "bad\\xff\\xc3");
        assert!(printable(&(0..=255).collect::<Vec<u8>>())
            .chars()
            .all(|c| !c.is_control()));
    }
}
