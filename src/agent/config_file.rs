//! Static configuration: a TOML file imported as config keys.
//!
//! Tables become path segments, so
//!
//! ```toml
//! [prod.orders]
//! max_conn = 100
//! name = "orders"
//! ```
//!
//! becomes the keys `prod/orders/max_conn` = `100` and `prod/orders/name` = `orders`. Strings
//! are stored as their text; numbers, booleans and dates as their TOML text; arrays and inline
//! values as JSON. The first segment is the environment namespace.
//!
//! Precedence: importing writes every key of the file, as `grapevine config set` would, with
//! the current time. The imported values therefore replace older values of the same keys on
//! every node, and any later write (from any node) replaces them. Keys absent from the file
//! are left alone. `grapevine agent --config-file` imports at agent start, so restarting an
//! agent re-applies its file.

use crate::state::config::{validate_key, ConfigError, MAX_VALUE_LEN};

/// Why a configuration file could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key or value breaks the store's rules.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        source: ConfigError,
    },
}

/// Largest configuration file read.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Reads and flattens a TOML file into `(key, value)` pairs, in key order.
pub fn load(path: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>, ConfigFileError> {
    let shown = path.display().to_string();
    let read = |source| ConfigFileError::Read {
        path: shown.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_FILE_BYTES {
        return Err(read(std::io::Error::other(format!(
            "{size} bytes is above the limit of {MAX_FILE_BYTES}"
        ))));
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    parse(&text).map_err(|error| match error {
        ParseError::Toml(message) => ConfigFileError::Parse {
            path: shown.clone(),
            message,
        },
        ParseError::Invalid(source) => ConfigFileError::Invalid {
            path: shown.clone(),
            source,
        },
    })
}

/// Why TOML text could not be flattened.
#[derive(Debug)]
pub enum ParseError {
    /// Not TOML.
    Toml(String),
    /// A key or value the store refuses.
    Invalid(ConfigError),
}

/// Flattens TOML text into `(key, value)` pairs, in key order.
pub fn parse(text: &str) -> Result<Vec<(String, Vec<u8>)>, ParseError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ParseError::Toml(e.to_string().lines().collect::<Vec<_>>().join(" "))
    })?;
    let mut out = Vec::new();
    flatten(&mut out, "", &toml::Value::Table(table))?;
    out.sort();
    Ok(out)
}

fn flatten(
    out: &mut Vec<(String, Vec<u8>)>,
    prefix: &str,
    value: &toml::Value,
) -> Result<(), ParseError> {
    let bytes = match value {
        toml::Value::Table(table) => {
            for (name, inner) in table {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                flatten(out, &key, inner)?;
            }
            return Ok(());
        }
        toml::Value::String(text) => text.clone().into_bytes(),
        toml::Value::Array(_) => serde_json::to_vec(value).map_err(|source| {
            ParseError::Invalid(ConfigError::Json {
                key: prefix.to_string(),
                source,
            })
        })?,
        other => other.to_string().into_bytes(),
    };
    validate_key(prefix).map_err(ParseError::Invalid)?;
    if bytes.len() > MAX_VALUE_LEN {
        return Err(ParseError::Invalid(ConfigError::ValueTooLarge {
            key: prefix.to_string(),
            len: bytes.len(),
        }));
    }
    out.push((prefix.to_string(), bytes));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_become_paths() {
        let parsed = parse(
            r#"
            [prod.orders]
            max_conn = 100
            name = "orders"
            ratio = 0.5
            enabled = true
            zones = ["a", "b"]
            [staging.orders]
            max_conn = 5
            "#,
        )
        .unwrap();
        let text: Vec<(String, String)> = parsed
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            text,
            [
                ("prod/orders/enabled", "true"),
                ("prod/orders/max_conn", "100"),
                ("prod/orders/name", "orders"),
                ("prod/orders/ratio", "0.5"),
                ("prod/orders/zones", r#"["a","b"]"#),
                ("staging/orders/max_conn", "5"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        assert!(matches!(parse("[prod"), Err(ParseError::Toml(_))));
        // A top-level scalar is a one-segment key, as Consul allows.
        let top = parse("x = 1").unwrap();
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, "x");
        assert!(matches!(
            parse("[prod]\n\"bad key!\" = 1"),
            Err(ParseError::Invalid(_))
        ));
    }
}
