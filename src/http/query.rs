//! Query strings and durations: parsed strictly, so that a typo is a 400, not a silent
//! default.

use std::time::Duration;

use super::ApiError;

/// The parameters of one request, in order of appearance.
#[derive(Debug, Default)]
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
}

/// At most this many parameters are read; a longer query string is refused.
const MAX_PARAMS: usize = 64;

impl Params {
    /// Parses `query`, refusing parameters not in `allowed`.
    pub(crate) fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut pairs = Vec::new();
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if pairs.len() == MAX_PARAMS {
                return Err(ApiError::bad_request(format!(
                    "more than {MAX_PARAMS} query parameters"
                )));
            }
            // The token is read (and checked) before any handler, for every route.
            if !allowed.contains(&name.as_ref()) && name != "token" {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {name:?}; this endpoint takes {}",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
            pairs.push((name.into_owned(), value.into_owned()));
        }
        Ok(Params { pairs })
    }

    fn last(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the parameter is present (with any value).
    pub(crate) fn has(&self, name: &str) -> bool {
        self.last(name).is_some()
    }

    /// Every value of a repeatable parameter.
    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A flag: present bare (`?passing`) or as `true`/`false`/`1`/`0`.
    pub(crate) fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.last(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "{name}={other:?} is not a flag (give it bare, or true/false)"
            ))),
        }
    }

    /// An optional string.
    pub(crate) fn string(&self, name: &str) -> Option<&str> {
        self.last(name)
    }

    /// The blocking-query index, if given.
    pub(crate) fn index(&self) -> Result<Option<u64>, ApiError> {
        self.last("index")
            .map(|text| {
                text.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("index={text:?} is not a non-negative integer"))
                })
            })
            .transpose()
    }

    /// The blocking-query wait: `default` when absent, capped at `max`.
    pub(crate) fn wait(&self, default: Duration, max: Duration) -> Result<Duration, ApiError> {
        match self.last("wait") {
            None => Ok(default.min(max)),
            Some(text) => parse_duration(text)
                .map(|wait| wait.min(max))
                .map_err(|error| ApiError::bad_request(format!("wait={text:?}: {error}"))),
        }
    }
}

/// Parses a duration the way Consul writes them: a number and a unit, `ms`, `s`, `m` or `h`
/// (`500ms`, `30s`, `1.5m`); a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| "not a duration like 500ms, 30s, 5m or 1h".to_string())?;
    let scale = match unit {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?}; use ms, s, m or h")),
    };
    let seconds = value * scale;
    if !seconds.is_finite() || seconds > 1e9 {
        return Err("too long".to_string());
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "10x", "-1s", "1e99h", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn params_are_strict() {
        let params = Params::parse(
            Some("passing&tag=a&tag=b&index=7&wait=1m"),
            &["passing", "tag", "index", "wait"],
        )
        .unwrap();
        assert!(params.flag("passing").unwrap());
        assert_eq!(params.all("tag"), vec!["a", "b"]);
        assert_eq!(params.index().unwrap(), Some(7));
        let cap = Duration::from_secs(10);
        assert_eq!(params.wait(Duration::ZERO, cap).unwrap(), cap);
        assert!(Params::parse(Some("tags=a"), &["tag"]).is_err());
        let bad = Params::parse(Some("index=-1&wait=soon"), &["index", "wait"]).unwrap();
        assert!(bad.index().is_err());
        assert!(bad.wait(cap, cap).is_err());
        let flag = Params::parse(Some("passing=maybe"), &["passing"]).unwrap();
        assert!(flag.flag("passing").is_err());
    }
}
