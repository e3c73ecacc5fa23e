//! Reading the JSON option objects that cross the C boundary, with errors naming the key.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Parses an options string; `None` or an empty string is an empty object.
pub fn parse(json: Option<&str>) -> Result<Value> {
    let text = json.unwrap_or("").trim();
    if text.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Error::invalid(format!("options are not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::invalid("options must be a JSON object"));
    }
    Ok(value)
}

fn wrong(key: &str, expected: &str) -> Error {
    Error::invalid(format!("option '{key}' must be {expected}"))
}

/// A list of strings, if present.
pub fn string_list(opts: &Value, key: &str) -> Result<Option<Vec<String>>> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong(key, "a list of strings"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(wrong(key, "a list of strings")),
    }
}

/// A string, if present.
pub fn string(opts: &Value, key: &str) -> Result<Option<String>> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(wrong(key, "a string")),
    }
}

/// A non-negative integer that fits in 32 bits, if present.
pub fn uint(opts: &Value, key: &str) -> Result<Option<u32>> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| wrong(key, "a non-negative integer")),
    }
}

/// A timeout in milliseconds (negative = no limit), or `default`.
pub fn timeout_ms(opts: &Value, key: &str, default: i64) -> Result<i64> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| wrong(key, "an integer number of milliseconds")),
    }
}

/// A boolean, or `default`.
pub fn boolean(opts: &Value, key: &str, default: bool) -> Result<bool> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(wrong(key, "true or false")),
    }
}

/// An object, if present.
pub fn object<'a>(opts: &'a Value, key: &str) -> Result<Option<&'a Map<String, Value>>> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(wrong(key, "an object")),
    }
}

/// Refuses keys the caller may have misspelt, so a typo is an error instead of a silent default.
pub fn only_known(opts: &Value, known: &[&str]) -> Result<()> {
    if let Some(map) = opts.as_object() {
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(Error::invalid(format!(
                "unknown option '{k}' (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_missing_options_are_an_empty_object() {
        assert_eq!(parse(None).unwrap(), serde_json::json!({}));
        assert_eq!(parse(Some("  ")).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let o = parse(Some(r#"{"ssh": "ssh root@x", "t": "5", "b": 1}"#)).unwrap();
        assert!(
            string_list(&o, "ssh")
                .unwrap_err()
                .message
                .contains("'ssh' must be a list")
        );
        assert!(timeout_ms(&o, "t", 1).unwrap_err().message.contains("'t'"));
        assert!(boolean(&o, "b", false).is_err());
        assert!(parse(Some("[1]")).is_err());
        assert!(
            parse(Some("{"))
                .unwrap_err()
                .message
                .contains("not valid JSON")
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let o = parse(Some(r#"{"forwrds": []}"#)).unwrap();
        assert!(
            only_known(&o, &["forwards"])
                .unwrap_err()
                .message
                .contains("unknown option 'forwrds'")
        );
    }
}
