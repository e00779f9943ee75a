//! Node labels and selectors: `zone=b`, `role!=gpu`, `ssd` (has the key), `!gpu` (lacks it),
//! comma-separated, all of them must hold (as kubectl's equality-based selectors).
use std::collections::BTreeMap;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LabelError {
    #[error("label key {0:?}: 1-63 characters of [A-Za-z0-9._/-], starting and ending with a letter or digit")]
    BadKey(String),
    #[error("label value {0:?}: at most 63 characters of [A-Za-z0-9._-]")]
    BadValue(String),
    #[error("{0:?}: expected KEY=VALUE (or KEY- to remove)")]
    BadLabel(String),
    #[error("selector {0:?}: expected KEY=VALUE, KEY!=VALUE, KEY or !KEY, comma-separated")]
    BadSelector(String),
    #[error("at most 64 labels per node")]
    TooMany,
}

pub type Labels = BTreeMap<String, String>;

pub fn check_key(k: &str) -> Result<(), LabelError> {
    let ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && k.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(LabelError::BadKey(k.chars().take(80).collect()))
    }
}

pub fn check_value(v: &str) -> Result<(), LabelError> {
    if v.len() <= 63 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        Ok(())
    } else {
        Err(LabelError::BadValue(v.chars().take(80).collect()))
    }
}

/// Check a whole set of labels (what an agent asks for at enrollment).
pub fn check_all(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > 64 {
        return Err(LabelError::TooMany);
    }
    for (k, v) in labels {
        check_key(k)?;
        check_value(v)?;
    }
    Ok(())
}

/// `KEY=VALUE` to set, `KEY-` to remove: the arguments of `controller nodes label`.
pub fn parse_changes(args: &[String]) -> Result<(Labels, Vec<String>), LabelError> {
    let (mut set, mut remove) = (Labels::new(), Vec::new());
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            check_key(k)?;
            check_value(v)?;
            set.insert(k.to_string(), v.to_string());
        } else if let Some(k) = a.strip_suffix('-') {
            check_key(k)?;
            remove.push(k.to_string());
        } else {
            return Err(LabelError::BadLabel(a.chars().take(80).collect()));
        }
    }
    Ok((set, remove))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Has(String),
    Lacks(String),
}

/// A parsed selector; the empty one matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, LabelError> {
        let bad = || LabelError::BadSelector(text.chars().take(200).collect());
        let mut terms = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let term = if let Some((k, v)) = part.split_once("!=") {
                Term::Ne(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Term::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some(k) = part.strip_prefix('!') {
                Term::Lacks(k.trim().to_string())
            } else {
                Term::Has(part.to_string())
            };
            let (k, v) = match &term {
                Term::Eq(k, v) | Term::Ne(k, v) => (k, Some(v)),
                Term::Has(k) | Term::Lacks(k) => (k, None),
            };
            check_key(k).map_err(|_| bad())?;
            if let Some(v) = v {
                check_value(v).map_err(|_| bad())?;
            }
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Has(k) => labels.contains_key(k),
            Term::Lacks(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_match_like_kubectl_equality_selectors() {
        let a = labels(&[("zone", "b"), ("role", "web"), ("ssd", "")]);
        let b = labels(&[("zone", "b"), ("role", "gpu")]);
        let s = Selector::parse("zone=b,role!=gpu").unwrap();
        assert!(s.matches(&a) && !s.matches(&b));
        assert!(Selector::parse("ssd").unwrap().matches(&a) && !Selector::parse("ssd").unwrap().matches(&b));
        assert!(Selector::parse("!ssd").unwrap().matches(&b));
        assert!(Selector::parse("zone==b").unwrap().matches(&b));
        assert!(Selector::parse("").unwrap().matches(&b), "empty selects all");
        assert!(Selector::parse("missing!=x").unwrap().matches(&a), "!= holds for a missing key");
        for bad in ["zone=b c", "=x", "zone=b;rm", "-a", "a=ü"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_changes_parse_and_are_checked() {
        let (set, remove) = parse_changes(&["zone=b".into(), "gpu-".into(), "rack=r1".into()]).unwrap();
        assert_eq!(set, labels(&[("zone", "b"), ("rack", "r1")]));
        assert_eq!(remove, vec!["gpu".to_string()]);
        assert!(parse_changes(&["zone".into()]).is_err());
        assert!(parse_changes(&["-x=1".into()]).is_err());
        assert!(parse_changes(&[format!("k={}", "v".repeat(64))]).is_err());
        assert!(check_all(&(0..65).map(|i| (format!("k{i}"), String::new())).collect()).is_err());
        assert!(check_all(&labels(&[("topology.kubernetes.io/zone", "eu-1a")])).is_ok());
    }
}
