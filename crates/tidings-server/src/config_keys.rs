//! The configuration's keys as one list, read from the two texts that describe them: the
//! commented default file (`config::DEFAULT_TOML`, what `tidings config default` prints: each
//! key's default and a one-line note) and the key tables of `docs/configuration.md` (each
//! key's full meaning). `tidings config explain KEY` prints both.
//!
//! Why a reader and not a generator: the two texts are written for people and say different
//! things (a terse comment beside a value, a paragraph in a table), so neither can be produced
//! from the other. What must not drift is checked instead, by the tests at the bottom: the
//! docs embed `DEFAULT_TOML` byte for byte, every key in it has a row in the docs with the same
//! default, every row names a key that exists, and `DEFAULT_TOML` parses to `Config::default()`.

use crate::config::DEFAULT_TOML;

/// The reference text, compiled in so `config explain` works without the repository.
pub const CONFIGURATION_MD: &str = include_str!("../../../docs/configuration.md");

/// One key as `DEFAULT_TOML` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// `server`, `broker`, `auth` or `channels`.
    pub table: String,
    pub name: String,
    /// The value as written, e.g. `"15s"`; `None` when the line is commented out (unset).
    pub default: Option<String>,
    /// The example value of a commented-out line.
    pub example: Option<String>,
    pub note: String,
}

impl Key {
    /// `TIDINGS_SERVER__LISTEN` for `server.listen`; an array of tables (`pusher.apps`) is
    /// set in the file only.
    pub fn env_var(&self) -> String {
        if self.table.contains('.') {
            return "none (set in the configuration file)".into();
        }
        format!(
            "TIDINGS_{}__{}",
            self.table.to_ascii_uppercase(),
            self.name.to_ascii_uppercase()
        )
    }

    pub fn path(&self) -> String {
        format!("{}.{}", self.table, self.name)
    }
}

/// Every key of `DEFAULT_TOML`, in order. The `[namespaces.NAME]` example at the end takes
/// `[channels]`' keys and is not listed twice.
pub fn keys() -> Vec<Key> {
    let mut out: Vec<Key> = Vec::new();
    let mut table = String::new();
    for line in DEFAULT_TOML.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix('[') {
            table = rest.split(']').next().unwrap_or_default().to_owned();
            continue;
        }
        // `[[pusher.apps]]` is an array of tables, commented out because there is none by
        // default: its keys are listed under `pusher.apps`.
        if let Some(rest) = trimmed.strip_prefix("# [[") {
            table = rest.split(']').next().unwrap_or_default().to_owned();
            continue;
        }
        if trimmed.starts_with("# [") {
            break;
        }
        // A comment line indented to the note column continues the previous key's note.
        if line.starts_with(' ') && trimmed.starts_with('#') {
            if let Some(last) = out.last_mut() {
                let more = trimmed.trim_start_matches('#').trim();
                last.note = format!("{} {more}", last.note).trim().to_owned();
            }
            continue;
        }
        let (commented, body) = match trimmed.strip_prefix("# ") {
            Some(b) => (true, b),
            None => (false, trimmed),
        };
        let Some((name, rest)) = body.split_once(" = ") else {
            continue;
        };
        let name = name.trim();
        if table.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        let (value, note) = split_value(rest.trim());
        out.push(Key {
            table: table.clone(),
            name: name.to_owned(),
            default: (!commented).then(|| value.clone()),
            example: commented.then_some(value),
            note,
        });
    }
    out
}

/// `"a # b"  # note` → (`"a # b"`, `note`): a value ends at its closing quote or bracket, or
/// at the first space for a bare value.
fn split_value(s: &str) -> (String, String) {
    let end = match s.as_bytes().first() {
        Some(b'"') => s[1..].find('"').map_or(s.len(), |i| i + 2),
        Some(b'[') => s.find(']').map_or(s.len(), |i| i + 1),
        _ => s.find(char::is_whitespace).unwrap_or(s.len()),
    };
    let (value, rest) = s.split_at(end);
    let note = rest.trim().trim_start_matches('#').trim();
    (value.trim().to_owned(), note.to_owned())
}

/// A row of a key table in docs/configuration.md: the keys it names, its default cell (absent
/// in the two-column `[auth]` table) and its meaning.
#[derive(Clone, Debug)]
pub struct DocRow {
    pub table: String,
    pub names: Vec<String>,
    pub default: Option<String>,
    pub meaning: String,
}

/// The rows of the docs' `### \`[TABLE]\`` sections.
pub fn doc_rows() -> Vec<DocRow> {
    let mut rows = Vec::new();
    let mut table: Option<String> = None;
    for line in CONFIGURATION_MD.lines() {
        if let Some(heading) = line.strip_prefix("### `[") {
            table = heading
                .split(']')
                .next()
                .map(|t| t.trim_start_matches('[').to_owned());
            continue;
        }
        if line.starts_with("## ") {
            table = None;
        }
        let Some(table) = &table else { continue };
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(str::trim)
            .collect();
        let names = cells[0]
            .split(',')
            .map(|n| n.trim().trim_matches('`').to_owned())
            .collect();
        let (default, meaning) = match cells.len() {
            2 => (None, cells[1].to_owned()),
            n if n >= 3 => (Some(cells[1].to_owned()), cells[2..].join(" | ")),
            _ => continue,
        };
        rows.push(DocRow {
            table: table.clone(),
            names,
            default,
            meaning,
        });
    }
    rows
}

/// What `tidings config explain KEY` prints; `KEY` is `table.name` or a name unique across
/// tables. `Err` lists what exists.
pub fn explain(query: &str) -> Result<String, String> {
    let all = keys();
    let matches: Vec<&Key> = all
        .iter()
        .filter(|k| k.path() == query || k.name == query)
        .collect();
    let key = match matches.as_slice() {
        [k] => *k,
        [] => {
            let names: Vec<String> = all.iter().map(Key::path).collect();
            return Err(format!(
                "no key {query:?}; the keys are: {}",
                names.join(", ")
            ));
        }
        many => {
            let names: Vec<String> = many.iter().map(|k| k.path()).collect();
            return Err(format!("{query:?} is ambiguous: {}", names.join(", ")));
        }
    };
    let meaning = doc_rows()
        .into_iter()
        .find(|r| r.table == key.table && r.names.contains(&key.name))
        .map(|r| r.meaning)
        .unwrap_or_default();
    let default = match (&key.default, &key.example) {
        (Some(d), _) => d.clone(),
        (None, Some(e)) => format!("unset (e.g. {e})"),
        (None, None) => "unset".into(),
    };
    let mut out = format!(
        "{}\n  default:     {default}\n  environment: {}\n",
        key.path(),
        key.env_var()
    );
    if !key.note.is_empty() {
        out.push_str(&format!("  note:        {}\n", key.note));
    }
    if !meaning.is_empty() {
        out.push_str(&format!("\n{}\n", wrap(&meaning.replace('`', ""), 96)));
    }
    Ok(out)
}

fn wrap(text: &str, width: usize) -> String {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().map_or(0, |l| l.len());
        if line > 0 && line + 1 + word.len() > width {
            lines.push(String::new());
        }
        if let Some(l) = lines.last_mut() {
            if !l.is_empty() {
                l.push(' ');
            }
            l.push_str(word);
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;

    /// Cells compare without markup: `"15s"` and `` `"15s"` `` and 100000 and 100,000 agree.
    fn normal(s: &str) -> String {
        s.chars()
            .filter(|c| !matches!(c, '`' | ',' | '_' | ' '))
            .collect()
    }

    #[test]
    fn the_docs_embed_the_default_configuration_byte_for_byte() {
        let start = CONFIGURATION_MD
            .find("```toml\n# Tidings configuration.")
            .expect("docs/configuration.md embeds `tidings config default` in a ```toml block");
        let block = &CONFIGURATION_MD[start + "```toml\n".len()..];
        let block = &block[..block.find("```").unwrap()];
        assert_eq!(
            block, DEFAULT_TOML,
            "docs/configuration.md's copy of `config default` differs: paste `tidings config default` there"
        );
    }

    #[test]
    fn every_default_key_has_a_docs_row_with_the_same_default_and_every_row_a_key() {
        let keys = keys();
        assert!(keys.len() > 30, "{} keys parsed", keys.len());
        let rows = doc_rows();
        for key in &keys {
            let row = rows
                .iter()
                .find(|r| r.table == key.table && r.names.contains(&key.name))
                .unwrap_or_else(|| panic!("docs/configuration.md has no row for {}", key.path()));
            let (Some(doc_default), Some(default)) = (&row.default, &key.default) else {
                continue;
            };
            assert!(
                normal(doc_default).starts_with(&normal(default)),
                "{}: `config default` says {default}, docs/configuration.md says {doc_default}",
                key.path()
            );
        }
        for row in &rows {
            for name in &row.names {
                assert!(
                    keys.iter().any(|k| k.table == row.table && &k.name == name),
                    "docs/configuration.md documents {}.{name}, which `config default` does not have",
                    row.table
                );
            }
        }
    }

    #[test]
    fn the_default_text_parses_to_the_built_in_defaults() {
        let parsed = Config::from_toml(DEFAULT_TOML).unwrap();
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", Config::default()),
            "DEFAULT_TOML and the Default impls disagree"
        );
    }

    #[test]
    fn explain_names_the_default_the_environment_variable_and_the_meaning() {
        let text = explain("server.long_poll_max_wait").unwrap();
        assert!(
            text.contains("TIDINGS_SERVER__LONG_POLL_MAX_WAIT"),
            "{text}"
        );
        assert!(text.contains("\"60s\""), "{text}");
        let text = explain("jwt_secret").unwrap();
        assert!(text.starts_with("auth.jwt_secret"), "{text}");
        assert!(text.contains("unset"), "{text}");
        assert!(text.contains("16 characters"), "{text}");
        assert!(explain("nonsense").unwrap_err().contains("server.listen"));
    }
}
