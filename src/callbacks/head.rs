//! The envelope fields the dispatcher needs, read from an event's JSON without building a
//! `serde_json::Value` tree: the header (id, type, time, token, app, tenant), the v1 shape's
//! equivalents, and the two `event` fields read before a handler runs (the message's id, the
//! sender's open_id). The rest of the payload is checked but not kept; a handler that needs
//! it parses the bytes again (see `EventEnvelope::json`).
//!
//! It accepts and refuses exactly what `serde_json::from_slice::<Value>` does, and reads the
//! same values: every value goes through serde_json's `deserialize_any` (the path a `Value`
//! is built through: the same nesting limit, the same checks of strings, escapes, numbers and
//! trailing bytes), and a key given twice takes its last value, as a `Value` map does.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A value of interest as the full parse would see it: absent, a string, or something else.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    /// The key is not there.
    #[default]
    Absent,
    /// A JSON string.
    Str(String),
    /// Any other JSON value (`null` included).
    Other,
}

impl Field {
    /// The string, if it is one (`Value::as_str`).
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// True if the key is there, whatever its value (`Value::get(..).is_some()`).
    pub(crate) fn present(&self) -> bool {
        !matches!(self, Self::Absent)
    }

    fn take(self) -> Option<String> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// What the dispatcher reads of an event's envelope, both shapes.
#[derive(Debug, Default)]
pub(crate) struct Head {
    /// `schema` (v2 when present, whatever its value).
    pub(crate) schema: Field,
    /// `type` (a v1 `url_verification`).
    pub(crate) kind: Field,
    /// `uuid`, `ts`, `token` (v1).
    pub(crate) uuid: Field,
    pub(crate) ts: Field,
    pub(crate) token: Field,
    /// `header` (v2): present, and its fields when it is an object.
    pub(crate) header: Nested<Header>,
    /// `event`.
    pub(crate) event: Nested<Event>,
}

/// `header.*` (v2).
#[derive(Debug, Default)]
pub(crate) struct Header {
    pub(crate) event_id: Field,
    pub(crate) event_type: Field,
    pub(crate) create_time: Field,
    pub(crate) token: Field,
    pub(crate) app_id: Field,
    pub(crate) tenant_key: Field,
}

/// `event.*`: the v1 header fields and what the dispatcher reads before the handler.
#[derive(Debug, Default)]
pub(crate) struct Event {
    pub(crate) kind: Field,
    pub(crate) app_id: Field,
    pub(crate) tenant_key: Field,
    pub(crate) message: Nested<Message>,
    pub(crate) sender: Nested<Sender>,
}

/// `event.message.*`.
#[derive(Debug, Default)]
pub(crate) struct Message {
    pub(crate) message_id: Field,
}

/// `event.sender.*`.
#[derive(Debug, Default)]
pub(crate) struct Sender {
    pub(crate) sender_id: Nested<SenderId>,
}

/// `event.sender.sender_id.*`.
#[derive(Debug, Default)]
pub(crate) struct SenderId {
    pub(crate) open_id: Field,
}

/// A key's value that is read into when it is an object.
#[derive(Debug, Default)]
pub(crate) enum Nested<T> {
    /// The key is not there.
    #[default]
    Absent,
    /// The key holds an object; these are its fields of interest.
    Object(T),
    /// The key holds anything else.
    Other,
}

impl<T> Nested<T> {
    /// The object's fields, if the key holds an object.
    pub(crate) fn get(&self) -> Option<&T> {
        match self {
            Self::Object(t) => Some(t),
            _ => None,
        }
    }

    /// True if the key is there, whatever its value.
    pub(crate) fn present(&self) -> bool {
        !matches!(self, Self::Absent)
    }
}

impl Head {
    /// Reads `json` as the full parse would, keeping only the fields above. `None` when the
    /// full parse would fail or the top level is not an object.
    pub(crate) fn read(json: &[u8]) -> Option<Self> {
        match serde_json::from_slice::<Nested<Self>>(json) {
            Ok(Nested::Object(h)) => Some(h),
            _ => None,
        }
    }
}

/// Takes a field's string out of it.
pub(crate) fn take_str(f: &mut Field) -> Option<String> {
    std::mem::take(f).take()
}

/// An object whose fields of interest are named in `NAMES`; `set` reads the value of the
/// key at that index.
trait Fields: Default {
    const NAMES: &'static [&'static str];
    fn set<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error>;
}

impl Fields for Head {
    const NAMES: &'static [&'static str] =
        &["schema", "type", "uuid", "ts", "token", "header", "event"];
    fn set<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.schema = map.next_value()?,
            1 => self.kind = map.next_value()?,
            2 => self.uuid = map.next_value()?,
            3 => self.ts = map.next_value()?,
            4 => self.token = map.next_value()?,
            5 => self.header = map.next_value()?,
            _ => self.event = map.next_value()?,
        }
        Ok(())
    }
}

impl Fields for Header {
    const NAMES: &'static [&'static str] = &[
        "event_id",
        "event_type",
        "create_time",
        "token",
        "app_id",
        "tenant_key",
    ];
    fn set<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.event_id = map.next_value()?,
            1 => self.event_type = map.next_value()?,
            2 => self.create_time = map.next_value()?,
            3 => self.token = map.next_value()?,
            4 => self.app_id = map.next_value()?,
            _ => self.tenant_key = map.next_value()?,
        }
        Ok(())
    }
}

impl Fields for Event {
    const NAMES: &'static [&'static str] = &["type", "app_id", "tenant_key", "message", "sender"];
    fn set<'de, A: MapAccess<'de>>(&mut self, index: usize, map: &mut A) -> Result<(), A::Error> {
        match index {
            0 => self.kind = map.next_value()?,
            1 => self.app_id = map.next_value()?,
            2 => self.tenant_key = map.next_value()?,
            3 => self.message = map.next_value()?,
            _ => self.sender = map.next_value()?,
        }
        Ok(())
    }
}

impl Fields for Message {
    const NAMES: &'static [&'static str] = &["message_id"];
    fn set<'de, A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.message_id = map.next_value()?;
        Ok(())
    }
}

impl Fields for Sender {
    const NAMES: &'static [&'static str] = &["sender_id"];
    fn set<'de, A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.sender_id = map.next_value()?;
        Ok(())
    }
}

impl Fields for SenderId {
    const NAMES: &'static [&'static str] = &["open_id"];
    fn set<'de, A: MapAccess<'de>>(&mut self, _: usize, map: &mut A) -> Result<(), A::Error> {
        self.open_id = map.next_value()?;
        Ok(())
    }
}

/// Skips any value, checking it as the full parse would (through `deserialize_any`).
struct Skip;

impl<'de> serde::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

/// Implements the scalar visits of a visitor as "any other value".
macro_rules! scalars {
    ($de:lifetime, $out:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_seq<A: SeqAccess<$de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<Skip>()?.is_some() {}
            Ok($out)
        }
    };
}

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    scalars!('de, Skip);
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

impl<'de> serde::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    scalars!('de, Field::Other);
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Field, E> {
        Ok(Field::Str(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Field, E> {
        Ok(Field::Str(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Field::Other)
    }
}

impl<'de, T: Fields> serde::Deserialize<'de> for Nested<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NestedVisitor(std::marker::PhantomData))
    }
}

struct NestedVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Fields> Visitor<'de> for NestedVisitor<T> {
    type Value = Nested<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    scalars!('de, Nested::Other);
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Nested<T>, E> {
        Ok(Nested::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Nested<T>, A::Error> {
        let mut t = T::default();
        while let Some(key) = map.next_key_seed(Key(T::NAMES))? {
            match key {
                // A key given twice: its last value counts, as in a `Value` map.
                Some(i) => t.set(i, &mut map)?,
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Nested::Object(t))
    }
}

/// A key, as the index of its name in the list (or `None`), without keeping it.
struct Key(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| *n == v))
    }
}
