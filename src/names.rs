//! The names an acquisition asks for, in the forms callers have at hand.

use std::borrow::Cow;

use smallvec::SmallVec;

/// The limit names of one acquisition. Built by [`IntoNames`]; not built
/// directly.
#[derive(Debug, Clone)]
pub struct Names<'a>(Repr<'a>);

#[derive(Debug, Clone)]
enum Repr<'a> {
    /// The common case.
    One(Cow<'a, str>),
    /// Up to four names without allocating.
    Many(SmallVec<[Cow<'a, str>; 4]>),
}

impl<'a> Names<'a> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match &self.0 {
            Repr::One(name) => (Some(name.as_ref()), &[][..]),
            Repr::Many(names) => (None, names.as_slice()),
        };
        one.into_iter().chain(many.iter().map(|n| n.as_ref()))
    }

    /// The name, if there is exactly one.
    #[inline]
    pub(crate) fn single(&self) -> Option<&str> {
        match &self.0 {
            Repr::One(name) => Some(name),
            Repr::Many(_) => None,
        }
    }

    /// The names, comma-separated, for messages.
    pub(crate) fn joined(&self) -> String {
        self.iter().collect::<Vec<_>>().join(", ")
    }

    pub(crate) fn into_owned(self) -> Names<'static> {
        Names(match self.0 {
            Repr::One(name) => Repr::One(Cow::Owned(name.into_owned())),
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
        Names(Repr::Many(names.into_iter().map(Into::into).collect()))
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
    }
}
