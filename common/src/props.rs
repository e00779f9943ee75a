//! Property tests for the parsers of untrusted input in this crate (bootstrap tokens, CA pins,
//! path containment, secret redaction, terminal escaping). They run under `cargo test`; failures
//! proptest finds are saved in `proptest-regressions/` and replayed first on every run.
use proptest::prelude::*;
use std::path::Path;

use crate::fsutil::is_below;
use crate::pin::CaPin;
use crate::redact::{for_terminal, secrets};
use crate::token::BootstrapToken;

proptest! {
    #[test]
    fn token_parse_never_panics_and_accepts_only_its_format(s in "\\PC{0,40}") {
        if let Ok(t) = BootstrapToken::parse(&s) {
            prop_assert_eq!(t.id.len(), 6);
            prop_assert_eq!(t.expose().len(), 23);
        }
    }

    #[test]
    fn well_formed_tokens_round_trip(id in "[a-z0-9]{6}", secret in "[a-z0-9]{16}") {
        let t = BootstrapToken::parse(&format!("{id}.{secret}")).unwrap();
        prop_assert_eq!(t.expose(), format!("{id}.{secret}"));
    }

    #[test]
    fn pin_parse_never_panics(s in "\\PC{0,90}") {
        let _ = CaPin::parse(&s);
    }

    #[test]
    fn pins_round_trip(hex in "[0-9a-f]{64}") {
        let text = format!("sha256:{hex}");
        prop_assert_eq!(CaPin::parse(&text).unwrap().to_string(), text);
    }

    #[test]
    fn below_means_inside_after_normalisation(parts in proptest::collection::vec("(\\.\\.|\\.|[a-z]{1,3})", 0..6)) {
        let p = format!("/etc/kubernetes/{}", parts.join("/"));
        if is_below(Path::new("/etc/kubernetes"), Path::new(&p)) {
            // No component may climb out: resolve the path lexically and check.
            let mut stack: Vec<&str> = vec![];
            for c in p.split('/').filter(|c| !c.is_empty() && *c != ".") {
                if c == ".." { stack.pop(); } else { stack.push(c); }
            }
            prop_assert!(stack.len() > 2 && stack[0] == "etc" && stack[1] == "kubernetes", "{}", p);
        }
    }

    #[test]
    fn redaction_removes_every_token_and_is_idempotent(
        before in "\\PC{0,30}", id in "[a-z0-9]{6}", secret in "[a-z0-9]{16}", after in "\\PC{0,30}",
    ) {
        let text = format!("{before} {id}.{secret} {after}");
        let once = secrets(&text).into_owned();
        prop_assert!(!once.contains(&format!("{id}.{secret}")), "{}", once);
        prop_assert_eq!(secrets(&once).into_owned(), once.clone());
    }

    #[test]
    fn terminal_text_never_carries_control_characters(s in "\\PC*|[\\x00-\\x1f\\x7f-\\u{9f}a-z]{0,40}") {
        let multi = for_terminal(&s, true);
        prop_assert!(!multi.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
        let single = for_terminal(&s, false);
        prop_assert!(!single.chars().any(char::is_control));
    }
}
