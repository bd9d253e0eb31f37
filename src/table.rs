//! Plain-text tables for the human output of `status` and `history`.

/// The lines of a left-aligned table with a header row; the last column is not padded.
pub fn render<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) -> Vec<String> {
    let mut widths = headers.map(|h| h.chars().count());
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_string()
    };
    std::iter::once(line(headers.to_vec()))
        .chain(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_padded_but_the_last() {
        let lines = super::render(&["A", "BB"], &[["xyz".to_string(), "1".to_string()]]);
        assert_eq!(lines, ["A    BB", "xyz  1"]);
    }
}
