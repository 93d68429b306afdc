//! JSON members read for one scalar each, without building a `Value`: a
//! member of another type is skipped and counts as absent, never as an error
//! that would lose the other members. Request and answer bodies are read
//! this way on every request.

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::marker::PhantomData;

/// A whole number that fits a u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub Option<u64>);

/// A count or completion budget: a non-negative number up to `u32::MAX`,
/// fractions cut (as a budget of 16.5 tokens is 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget(pub Option<u64>);

/// A string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub Option<String>);

/// A boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub Option<bool>);

trait FromScalar: Sized {
    fn none() -> Self;
    fn from_u64(_: u64) -> Self {
        Self::none()
    }
    fn from_f64(_: f64) -> Self {
        Self::none()
    }
    fn from_text(_: &str) -> Self {
        Self::none()
    }
    fn from_bool(_: bool) -> Self {
        Self::none()
    }
}

impl FromScalar for Count {
    fn none() -> Self {
        Count(None)
    }
    fn from_u64(n: u64) -> Self {
        Count(Some(n))
    }
}

impl FromScalar for Budget {
    fn none() -> Self {
        Budget(None)
    }
    fn from_u64(n: u64) -> Self {
        Budget((n <= u64::from(u32::MAX)).then_some(n))
    }
    fn from_f64(x: f64) -> Self {
        // Truncation is the point: a fractional budget counts its whole tokens.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Budget((x.is_finite() && x >= 0.0 && x <= f64::from(u32::MAX)).then_some(x as u64))
    }
}

impl FromScalar for Text {
    fn none() -> Self {
        Text(None)
    }
    fn from_text(s: &str) -> Self {
        Text(Some(s.to_string()))
    }
}

impl FromScalar for Flag {
    fn none() -> Self {
        Flag(None)
    }
    fn from_bool(b: bool) -> Self {
        Flag(Some(b))
    }
}

/// Takes any JSON value; keeps what `T` makes of it.
struct Scalar<T>(PhantomData<T>);

impl<'de, T: FromScalar> Visitor<'de> for Scalar<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<T, E> {
        Ok(T::from_bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<T, E> {
        Ok(u64::try_from(n).map_or_else(|_| T::none(), T::from_u64))
    }
    fn visit_u64<E>(self, n: u64) -> Result<T, E> {
        Ok(T::from_u64(n))
    }
    fn visit_f64<E>(self, x: f64) -> Result<T, E> {
        Ok(T::from_f64(x))
    }
    fn visit_str<E>(self, s: &str) -> Result<T, E> {
        Ok(T::from_text(s))
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::none())
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::none())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(T::none())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(T::none())
    }
}

macro_rules! lenient {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(Scalar(PhantomData))
            }
        }
    )*};
}
lenient!(Count, Budget, Text, Flag);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Probe {
        count: Option<Count>,
        budget: Option<Budget>,
        text: Option<Text>,
        flag: Option<Flag>,
    }

    fn probe(json: &str) -> (Option<u64>, Option<u64>, Option<String>, Option<bool>) {
        let p: Probe = serde_json::from_str(json).unwrap();
        (p.count.and_then(|c| c.0), p.budget.and_then(|b| b.0), p.text.and_then(|t| t.0), p.flag.and_then(|f| f.0))
    }

    #[test]
    fn each_keeps_its_own_type_and_skips_the_rest() {
        assert_eq!(
            probe(r#"{"count":7,"budget":16.9,"text":"gpt-4o","flag":true}"#),
            (Some(7), Some(16), Some("gpt-4o".into()), Some(true))
        );
        assert_eq!(
            probe(r#"{"count":"7","budget":-1,"text":5,"flag":"true","other":[{"a":[1,2]}]}"#),
            (None, None, None, None)
        );
        assert_eq!(
            probe(r#"{"count":{"a":[1]},"budget":[16],"text":{"x":"y"},"flag":null}"#),
            (None, None, None, None)
        );
        assert_eq!(probe(r#"{"budget":4294967296}"#).1, None);
        assert_eq!(probe(r#"{"budget":4294967295}"#).1, Some(u64::from(u32::MAX)));
        assert_eq!(probe(r#"{"count":-3}"#).0, None);
        assert!(serde_json::from_str::<Probe>(r#"{"count":[1,}"#).is_err());
    }
}
