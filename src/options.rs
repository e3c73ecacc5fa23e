//! Reading the JSON option objects that cross the C boundary into typed structs.
//!
//! Each call's options are a struct deriving `serde::Deserialize` with
//! `#[serde(deny_unknown_fields)]` (and usually `#[serde(default)]`); [`from_value`] reads
//! one from the parsed options object. The field's Rust type says what a value must be, and
//! every error names the key, in the words callers (and the Perl tests) match on:
//!
//! | field type              | error                                              |
//! |-------------------------|----------------------------------------------------|
//! | `String`                | `option 'k' must be a string`                      |
//! | `Vec<String>`           | `option 'k' must be a list of strings`             |
//! | `u32`, `u64`            | `option 'k' must be a non-negative integer`        |
//! | `i64` (always a time)   | `option 'k' must be an integer number of milliseconds` |
//! | `bool` (see [`boolean`]) | `option 'k' must be true or false`                |
//! | `Map<String, Value>`    | `option 'k' must be an object`                     |
//! | (a key no field has)    | `unknown option 'k' (known: a, b, …)`              |
//!
//! A known key whose value is JSON `null` counts as absent (the field keeps its default).
//! Option sets made of two parts (a call's own options plus the ssh options) are read with
//! [`from_value_split`].

use crate::error::{Error, Result};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::fmt;

/// The one boolean rule of every option: JSON `true`/`false`, the numbers 1 and 0, and the
/// strings a command line or Perl hands over: "1", "true", "yes", "on" and "0", "false",
/// "no", "off", "" (any case, surrounding blanks ignored). Anything else is no boolean.
pub(crate) fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Parses an options string; `None` or an empty string is an empty object.
pub(crate) fn parse(json: Option<&str>) -> Result<Value> {
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

/// Reads `T` from an options object (see the module docs for the errors).
pub(crate) fn from_value<T: DeserializeOwned>(opts: &Value) -> Result<T> {
    from_map(object(opts)?, "")
}

/// Reads `T` from the object `map`; `prefix` goes before keys in errors (`"share."`).
pub(crate) fn from_map<T: DeserializeOwned>(map: &Map<String, Value>, prefix: &str) -> Result<T> {
    let mut read = Reader::new(map, prefix, &[]);
    T::deserialize(&mut read).map_err(|e| read.error(e, &[]))
}

/// Reads an options object that two structs share: `A` (which does *not* deny unknown
/// fields) takes the keys it has; `B` (which does) gets the rest, so a key neither knows is
/// refused, and the error lists the keys of both.
pub(crate) fn from_value_split<A: DeserializeOwned, B: DeserializeOwned>(
    opts: &Value,
) -> Result<(A, B)> {
    let map = object(opts)?;
    let mut first = Reader::new(map, "", &[]);
    let a = A::deserialize(&mut first).map_err(|e| first.error(e, &[]))?;
    let taken = first.taken.into_inner();
    let mut second = Reader::new(map, "", &taken);
    let b = B::deserialize(&mut second).map_err(|e| second.error(e, first.fields))?;
    Ok((a, b))
}

fn object(opts: &Value) -> Result<&Map<String, Value>> {
    opts.as_object()
        .ok_or_else(|| Error::invalid("options must be a JSON object"))
}

/// What went wrong while reading options, before the key is put in front.
#[derive(Debug)]
pub(crate) enum Problem {
    /// The value of the current key is not what its field takes ("a string", …).
    Expected(&'static str),
    /// A key no field has.
    Unknown(String, &'static [&'static str]),
    /// Anything else, as serde words it.
    Other(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Expected(what) => write!(f, "must be {what}"),
            Problem::Unknown(key, _) => write!(f, "unknown option '{key}'"),
            Problem::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Problem {}

impl de::Error for Problem {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Problem::Other(msg.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Problem::Unknown(field.to_string(), expected)
    }
}

/// The options object as a serde `Deserializer` of one struct. Remembers the key being read
/// (for errors), the struct's field names and which keys it took.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
    /// Keys another struct took (see [`from_value_split`]).
    skip: &'a [String],
    fields: &'static [&'static str],
    key: Option<&'a str>,
    taken: RefCell<Vec<String>>,
}

impl<'a> Reader<'a> {
    fn new(map: &'a Map<String, Value>, prefix: &'a str, skip: &'a [String]) -> Self {
        Reader {
            map,
            prefix,
            skip,
            fields: &[],
            key: None,
            taken: RefCell::new(Vec::new()),
        }
    }

    /// The error for the caller: key and problem; `more` are keys another struct knows.
    fn error(&self, problem: Problem, more: &[&str]) -> Error {
        let prefix = self.prefix;
        match (problem, self.key) {
            (Problem::Unknown(key, known), _) => {
                let known: Vec<String> = known
                    .iter()
                    .chain(more)
                    .map(|k| format!("{prefix}{k}"))
                    .collect();
                Error::invalid(format!(
                    "unknown option '{prefix}{key}' (known: {})",
                    known.join(", ")
                ))
            }
            (Problem::Expected(what), Some(key)) => {
                Error::invalid(format!("option '{prefix}{key}' must be {what}"))
            }
            (Problem::Other(msg), Some(key)) => {
                Error::invalid(format!("option '{prefix}{key}': {msg}"))
            }
            (p, None) => Error::invalid(format!("options: {p}")),
        }
    }
}

impl<'a> de::Deserializer<'a> for &mut Reader<'a> {
    type Error = Problem;

    fn deserialize_any<V: Visitor<'a>>(self, _: V) -> std::result::Result<V::Value, Problem> {
        Err(Problem::Other("options are read into a struct".into()))
    }

    fn deserialize_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> std::result::Result<V::Value, Problem> {
        self.fields = fields;
        let map = self.map;
        let skip = self.skip;
        let entries = map.iter().filter(move |(k, v)| {
            let taken_by_other = skip.contains(k);
            // null = absent for a known key; an unknown one is still refused.
            let absent = v.is_null() && fields.contains(&k.as_str());
            !taken_by_other && !absent
        });
        visitor.visit_map(Entries {
            entries,
            value: None,
            reader: self,
        })
    }

    serde::forward_to_deserialize_any! {
        <W: Visitor<'a>>
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

struct Entries<'r, 'a, I> {
    entries: I,
    value: Option<&'a Value>,
    reader: &'r mut Reader<'a>,
}

impl<'a, I: Iterator<Item = (&'a String, &'a Value)>> de::MapAccess<'a> for Entries<'_, 'a, I> {
    type Error = Problem;

    fn next_key_seed<K: de::DeserializeSeed<'a>>(
        &mut self,
        seed: K,
    ) -> std::result::Result<Option<K::Value>, Problem> {
        match self.entries.next() {
            None => Ok(None),
            Some((key, value)) => {
                self.reader.key = Some(key.as_str());
                self.value = Some(value);
                seed.deserialize(key.as_str().into_deserializer()).map(Some)
            }
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'a>>(
        &mut self,
        seed: V,
    ) -> std::result::Result<V::Value, Problem> {
        let value = self.value.take().unwrap_or(&Value::Null);
        let ignored = Cell::new(false);
        let out = seed.deserialize(Field {
            value,
            ignored: &ignored,
        })?;
        if !ignored.get() {
            if let Some(key) = self.reader.key {
                self.reader.taken.borrow_mut().push(key.to_string());
            }
        }
        Ok(out)
    }
}

/// One option's value; the error says what the field's type takes.
struct Field<'a, 'c> {
    value: &'a Value,
    /// Set when the struct skipped this key (not one of its fields).
    ignored: &'c Cell<bool>,
}

fn expected<T>(what: &'static str) -> std::result::Result<T, Problem> {
    Err(Problem::Expected(what))
}

const NON_NEGATIVE: &str = "a non-negative integer";

impl<'a> de::Deserializer<'a> for Field<'a, '_> {
    type Error = Problem;

    fn deserialize_any<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        // A field that takes any JSON (`Value`): serde_json's own reading.
        de::Deserializer::deserialize_any(self.value, v).map_err(|e| Problem::Other(e.to_string()))
    }

    fn deserialize_option<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_bool<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match boolean(self.value) {
            Some(b) => v.visit_bool(b),
            None => expected("true or false"),
        }
    }

    fn deserialize_u32<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => v.visit_u32(n),
            None => expected(NON_NEGATIVE),
        }
    }

    fn deserialize_u64<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value.as_u64() {
            Some(n) => v.visit_u64(n),
            None => expected(NON_NEGATIVE),
        }
    }

    /// Every `i64` option is a time in milliseconds (negative = no limit).
    fn deserialize_i64<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value.as_i64() {
            Some(n) => v.visit_i64(n),
            None => expected("an integer number of milliseconds"),
        }
    }

    fn deserialize_str<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value {
            Value::String(s) => v.visit_str(s),
            _ => expected("a string"),
        }
    }

    fn deserialize_string<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        self.deserialize_str(v)
    }

    /// Lists in options are lists of strings.
    fn deserialize_seq<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value {
            Value::Array(items) if items.iter().all(Value::is_string) => {
                let strings = items.iter().filter_map(Value::as_str);
                v.visit_seq(de::value::SeqDeserializer::new(strings))
            }
            _ => expected("a list of strings"),
        }
    }

    fn deserialize_map<V: Visitor<'a>>(self, v: V) -> std::result::Result<V::Value, Problem> {
        match self.value {
            Value::Object(_) => self.deserialize_any(v),
            _ => expected("an object"),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'a>>(
        self,
        v: V,
    ) -> std::result::Result<V::Value, Problem> {
        self.ignored.set(true);
        v.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        <W: Visitor<'a>>
        i8 i16 i32 i128 u8 u16 u128 f32 f64 char bytes byte_buf unit unit_struct
        newtype_struct tuple tuple_struct struct enum identifier
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        ssh: Option<Vec<String>>,
        t: i64,
        b: bool,
        n: u32,
        s: Option<String>,
        o: Option<Map<String, Value>>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Part {
        p: Option<String>,
    }

    fn err(v: Value) -> String {
        from_value::<Sample>(&v).unwrap_err().message
    }

    #[test]
    fn empty_or_missing_options_are_an_empty_object() {
        assert_eq!(parse(None).unwrap(), serde_json::json!({}));
        assert_eq!(parse(Some("  ")).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err(serde_json::json!({"ssh": "ssh root@x"}));
        assert!(e.contains("'ssh' must be a list"), "{e}");
        assert!(err(serde_json::json!({"t": "5"})).contains("'t'"));
        assert!(err(serde_json::json!({"b": 2})).contains("'b' must be true or false"));
        assert!(err(serde_json::json!({"b": "maybe"})).contains("'b' must be true or false"));
        let e = err(serde_json::json!({"n": -1}));
        assert_eq!(e, "option 'n' must be a non-negative integer");
        assert!(err(serde_json::json!({"n": 1u64 << 33})).contains("'n' must be a non-negative"));
        assert!(err(serde_json::json!({"s": 1})).contains("'s' must be a string"));
        assert!(err(serde_json::json!({"o": []})).contains("'o' must be an object"));
        assert!(err(serde_json::json!({"ssh": ["a", 1]})).contains("list of strings"));
        assert!(parse(Some("[1]")).is_err());
        assert!(
            parse(Some("{"))
                .unwrap_err()
                .message
                .contains("not valid JSON")
        );
    }

    #[test]
    fn values_null_and_defaults() {
        let s: Sample = from_value(&serde_json::json!({
            "ssh": ["ssh", "x"], "t": -1, "b": null, "n": 7, "o": {"a": 1}
        }))
        .unwrap();
        assert_eq!(s.ssh.unwrap(), ["ssh", "x"]);
        assert_eq!((s.t, s.b, s.n, s.s), (-1, false, 7, None));
        assert_eq!(s.o.unwrap()["a"], 1);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = err(serde_json::json!({"forwrds": []}));
        assert!(
            e.starts_with("unknown option 'forwrds' (known: ssh, t,"),
            "{e}"
        );
        // Also with a null value: a misspelt key is never silently ignored.
        assert!(err(serde_json::json!({"forwrds": null})).starts_with("unknown option"));
    }

    #[test]
    fn a_split_object_gives_each_part_its_keys_and_refuses_the_rest() {
        let (p, s): (Part, Sample) =
            from_value_split(&serde_json::json!({"p": "x", "n": 3})).unwrap();
        assert_eq!((p.p.as_deref(), s.n), (Some("x"), 3));
        let e = from_value_split::<Part, Sample>(&serde_json::json!({"q": 1}))
            .unwrap_err()
            .message;
        assert!(e.starts_with("unknown option 'q' (known: "), "{e}");
        assert!(
            e.ends_with(", p)"),
            "the other part's keys are listed too: {e}"
        );
        let e = from_value_split::<Part, Sample>(&serde_json::json!({"p": 1}))
            .unwrap_err()
            .message;
        assert_eq!(e, "option 'p' must be a string");
    }

    #[test]
    fn a_prefix_names_nested_keys() {
        let map = serde_json::json!({"x": 1});
        let e = from_map::<Sample>(map.as_object().unwrap(), "share.")
            .unwrap_err()
            .message;
        assert!(
            e.starts_with("unknown option 'share.x' (known: share.ssh"),
            "{e}"
        );
    }
}
