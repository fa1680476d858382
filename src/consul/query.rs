//! Query parameters as Consul reads them: repeatable keys (`tag=a&tag=b`), flags (`?passing`),
//! a blocking query's `index` and `wait`; and path segments, percent-decoded.

use std::time::Duration;

use super::decode::parse_go_duration;
use super::ApiError;

/// A blocking query's `wait` when none is given, and the most it may be (Consul's).
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Query parameters, decoded; a key may repeat (`tag=a&tag=b`).
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path segment: like a query value, but `+` is a plus.
pub(super) fn decode_segment(s: &str) -> String {
    percent_decode(&s.replace('+', "%2B"))
}

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// `?flag`, `?flag=1`, `?flag=true` → true; absent → false.
    pub(super) fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some("" | "1" | "true" | "t" | "T" | "TRUE" | "True") => Ok(true),
            Some("0" | "false" | "f" | "F" | "FALSE" | "False") => Ok(false),
            Some(_) => Err(ApiError::BadRequest(format!("Invalid value for ?{key}"))),
        }
    }

    /// `index` and `wait` of a blocking query; `None` for a plain query.
    pub(super) fn blocking(&self) -> Result<Option<(u64, Duration)>, ApiError> {
        let index = match self.get("index") {
            None | Some("") => return Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| ApiError::BadRequest("Invalid index".into()))?,
        };
        if index == 0 {
            return Ok(None);
        }
        let wait = match self.get("wait") {
            None | Some("") => DEFAULT_WAIT,
            Some(v) => parse_go_duration(v)
                .map_err(|_| ApiError::BadRequest("Invalid wait time".into()))?,
        };
        Ok(Some((index, wait.min(MAX_WAIT))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_decode_and_repeat() {
        let q = Query::parse(Some("passing&tag=a%20b&tag=c&index=12&wait=5s&token=x%2By"));
        assert_eq!(q.flag("passing"), Ok(true));
        assert_eq!(q.all("tag"), ["a b", "c"]);
        assert_eq!(q.get("token"), Some("x+y"));
        assert_eq!(q.blocking(), Ok(Some((12, Duration::from_secs(5)))));
        assert_eq!(Query::parse(Some("index=0")).blocking(), Ok(None));
        assert_eq!(
            Query::parse(Some("index=3&wait=1h")).blocking(),
            Ok(Some((3, MAX_WAIT)))
        );
        assert!(Query::parse(Some("index=x")).blocking().is_err());
        assert!(Query::parse(Some("passing=maybe")).flag("passing").is_err());
        assert_eq!(decode_segment("service%3Aweb+1"), "service:web+1");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
