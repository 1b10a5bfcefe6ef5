//! The names an acquisition asks for, in the forms callers have at hand.

use std::borrow::Cow;

/// The limit names of one acquisition. Built by [`IntoNames`]; not built
/// directly.
#[derive(Debug, Clone)]
pub struct Names<'a>(Repr<'a>);

#[derive(Debug, Clone)]
enum Repr<'a> {
    /// The common case.
    One(Cow<'a, str>),
    /// Up to four names without allocating, filled from the front. (An
    /// array keeps `Names` covariant in `'a`, which a `SmallVec` would not.)
    Few([Option<Cow<'a, str>>; FEW]),
    Many(Vec<Cow<'a, str>>),
}

/// Names held inline.
const FEW: usize = 4;

impl<'a> Names<'a> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, few, many) = match &self.0 {
            Repr::One(name) => (Some(name.as_ref()), &[][..], &[][..]),
            Repr::Few(names) => (None, &names[..], &[][..]),
            Repr::Many(names) => (None, &[][..], names.as_slice()),
        };
        one.into_iter()
            .chain(few.iter().map_while(|n| n.as_deref()))
            .chain(many.iter().map(|n| n.as_ref()))
    }

    /// The name, if there is exactly one.
    #[inline]
    pub(crate) fn single(&self) -> Option<&str> {
        match &self.0 {
            Repr::One(name) => Some(name),
            Repr::Few([Some(name), None, ..]) => Some(name),
            Repr::Few(_) => None,
            Repr::Many(names) => match names.as_slice() {
                [name] => Some(name),
                _ => None,
            },
        }
    }

    /// The names, comma-separated, for messages.
    pub(crate) fn joined(&self) -> String {
        self.iter().collect::<Vec<_>>().join(", ")
    }

    pub(crate) fn into_owned(self) -> Names<'static> {
        Names(match self.0 {
            Repr::One(name) => Repr::One(Cow::Owned(name.into_owned())),
            Repr::Few(names) => Repr::Few(names.map(|n| n.map(|n| Cow::Owned(n.into_owned())))),
            Repr::Many(names) => Repr::Many(
                names
                    .into_iter()
                    .map(|n| Cow::Owned(n.into_owned()))
                    .collect(),
            ),
        })
    }

    fn many<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Cow<'a, str>>,
    {
        let mut names = names.into_iter().map(Into::into);
        let mut few: [Option<Cow<'a, str>>; FEW] = Default::default();
        for slot in &mut few {
            match names.next() {
                Some(name) => *slot = Some(name),
                None => return Names(Repr::Few(few)),
            }
        }
        match names.next() {
            None => Names(Repr::Few(few)),
            Some(fifth) => Names(Repr::Many(
                few.into_iter()
                    .flatten()
                    .chain([fifth])
                    .chain(names)
                    .collect(),
            )),
        }
    }
}

/// Anything that names the limits of an acquisition: one name (`&str`,
/// `String`) or several (`&[&str]`, `[&str; N]`, `Vec<&str>`, `Vec<String>`,
/// `&[String]`). Duplicates count once; no names at all is allowed and
/// succeeds at once, holding nothing.
pub trait IntoNames<'a> {
    /// Converts into [`Names`].
    fn into_names(self) -> Names<'a>;
}

impl<'a> IntoNames<'a> for Names<'a> {
    fn into_names(self) -> Names<'a> {
        self
    }
}

impl<'a> IntoNames<'a> for &'a str {
    fn into_names(self) -> Names<'a> {
        Names(Repr::One(Cow::Borrowed(self)))
    }
}

impl<'a> IntoNames<'a> for &'a String {
    fn into_names(self) -> Names<'a> {
        Names(Repr::One(Cow::Borrowed(self.as_str())))
    }
}

impl<'a> IntoNames<'a> for String {
    fn into_names(self) -> Names<'a> {
        Names(Repr::One(Cow::Owned(self)))
    }
}

impl<'a, 'b: 'a> IntoNames<'a> for &'a [&'b str] {
    fn into_names(self) -> Names<'a> {
        Names::many(self.iter().copied())
    }
}

impl<'a, 'b: 'a, const N: usize> IntoNames<'a> for [&'b str; N] {
    fn into_names(self) -> Names<'a> {
        Names::many(self)
    }
}

impl<'a, 'b: 'a, const N: usize> IntoNames<'a> for &'a [&'b str; N] {
    fn into_names(self) -> Names<'a> {
        Names::many(self.iter().copied())
    }
}

impl<'a, 'b: 'a> IntoNames<'a> for Vec<&'b str> {
    fn into_names(self) -> Names<'a> {
        Names::many(self)
    }
}

impl<'a, 'b: 'a> IntoNames<'a> for &'a Vec<&'b str> {
    fn into_names(self) -> Names<'a> {
        Names::many(self.iter().copied())
    }
}

impl<'a> IntoNames<'a> for Vec<String> {
    fn into_names(self) -> Names<'a> {
        Names::many(self)
    }
}

impl<'a> IntoNames<'a> for &'a [String] {
    fn into_names(self) -> Names<'a> {
        Names::many(self.iter().map(String::as_str))
    }
}

impl<'a> IntoNames<'a> for &'a Vec<String> {
    fn into_names(self) -> Names<'a> {
        Names::many(self.iter().map(String::as_str))
    }
}

impl<'a, const N: usize> IntoNames<'a> for [String; N] {
    fn into_names(self) -> Names<'a> {
        Names::many(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list<'a>(names: impl IntoNames<'a>) -> Vec<String> {
        names.into_names().iter().map(str::to_string).collect()
    }

    #[test]
    fn every_form() {
        let owned = vec!["a".to_string(), "b".to_string()];
        assert_eq!(list("a"), ["a"]);
        assert_eq!(list("a".to_string()), ["a"]);
        assert_eq!(list(&["a", "b"][..]), ["a", "b"]);
        assert_eq!(list(["a", "b"]), ["a", "b"]);
        assert_eq!(list(vec!["a", "b"]), ["a", "b"]);
        assert_eq!(list(owned.clone()), ["a", "b"]);
        assert_eq!(list(&owned[..]), ["a", "b"]);
        assert_eq!(list(&owned), ["a", "b"]);
        assert!(list(Vec::<String>::new()).is_empty());
        assert_eq!(["a", "b"].into_names().joined(), "a, b");
        assert_eq!(list(["a", "b", "c", "d"]), ["a", "b", "c", "d"]);
        assert_eq!(list(["a", "b", "c", "d", "e"]), ["a", "b", "c", "d", "e"]);
        let six: Vec<String> = (0..6).map(|i| i.to_string()).collect();
        assert_eq!(list(six.clone()).len(), 6);
        assert_eq!(list(six.clone().into_names().into_owned()), six);
    }

    /// `Names` is covariant: names that live longer serve a shorter use.
    #[test]
    fn covariant() {
        fn shorten<'a>(names: Names<'static>) -> Names<'a> {
            names
        }
        assert_eq!(shorten(["x", "y"].into_names()).joined(), "x, y");
    }
}
