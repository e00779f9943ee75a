//! Secrets in text that hosts send back (task output): the real `kubeadm init` prints a join
//! command with `--token` and, with `--upload-certs`, the certificate key. They are replaced
//! before the text is stored or shown, so `cluster status`/`logs` never reveal them.
use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

pub const REDACTED: &str = "<redacted>";

static PATTERNS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // Bootstrap tokens (kubeadm's and fleetadm's format): [a-z0-9]{6}.[a-z0-9]{16}.
        r"\b[a-z0-9]{6}\.[a-z0-9]{16}\b",
        // `--certificate-key KEY`, `certificateKey: KEY`, "Using certificate key:\nKEY".
        r"(?i)(certificate[-_ ]?key[:=]?\s*)[0-9a-f]{64}\b",
        // `--token=X` / `--token X` whatever X looks like.
        r"(--(?:discovery-)?token[= ]+)\S+",
        // A private key block.
        r"(?s)-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
    ]
    .iter()
    .filter_map(|p| Regex::new(p).ok())
    .collect()
});

/// `text` with every secret replaced by [`REDACTED`] (keeping what introduces it, e.g. the flag).
pub fn secrets(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    for re in PATTERNS.iter() {
        if re.is_match(&out) {
            let replaced = re.replace_all(&out, |c: &regex::Captures<'_>| {
                format!("{}{REDACTED}", c.get(1).map(|m| m.as_str()).unwrap_or(""))
            });
            out = Cow::Owned(replaced.into_owned());
        }
    }
    out
}

/// `text` safe to print on a terminal: control characters (ESC sequences that move the cursor,
/// rewrite the title or hide text, and C1 controls) shown as `\u{..}` escapes. Newlines and tabs
/// are kept when `multiline`.
pub fn for_terminal(text: &str, multiline: bool) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(multiline && (c == '\n' || c == '\t'));
    if !text.chars().any(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_commands_and_certificate_keys_lose_their_secrets() {
        assert_eq!(PATTERNS.len(), 4, "every pattern compiles");
        let key = "a".repeat(64);
        let out = format!(
            "You can now join any number of control-plane nodes by running:\n\n  kubeadm join apiserver.cluster.local:6443 --token abcdef.0123456789abcdef \\\n\t--discovery-token-ca-cert-hash sha256:{h} \\\n\t--control-plane --certificate-key {key}\n\nUsing certificate key:\n{key}\n",
            h = "b".repeat(64)
        );
        let r = secrets(&out);
        assert!(!r.contains("0123456789abcdef"), "{r}");
        assert!(!r.contains(&key), "{r}");
        assert!(r.contains("--token <redacted>") && r.contains("--certificate-key <redacted>"), "{r}");
        // The CA hash is public (agents pin it): kept, so the output stays useful.
        assert!(r.contains(&format!("sha256:{}", "b".repeat(64))), "{r}");
        let pem = "x\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\ny";
        assert_eq!(secrets(pem), "x\n<redacted>\ny");
        assert!(matches!(secrets("nothing to hide"), Cow::Borrowed(_)));
    }

    #[test]
    fn terminal_text_has_no_live_control_characters() {
        let evil = "ok\u{1b}]0;owned\u{7}\u{1b}[2J\rline\u{9b}31m\n\tnext";
        let safe = for_terminal(evil, true);
        assert!(!safe.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{safe:?}");
        assert!(safe.contains("\\u{1b}]0;owned") && safe.contains("\n\tnext"), "{safe}");
        let one = for_terminal("host\nname", false);
        assert_eq!(one, "host\\u{a}name");
        assert!(matches!(for_terminal("plain", false), Cow::Borrowed(_)));
    }
}
